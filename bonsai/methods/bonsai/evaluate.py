"""Forward passes over calibration windows: the unmasked model (prior + base loss) and sub-models (U).

Sub-models are virtual (masks on a live model). Rows of a batch may belong to different sub-models,
so small calibration sets still fill a batch (rows of one batch share the block their sub-models first
differ from the current model in: the forward starts there, `bonsai.engine.prefix`). The loss is
accumulated in float32/64.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from bonsai.adapters.base import ArchAdapter, GroupKey
from bonsai.engine.divergence import TopK
from bonsai.engine.logits import ChunkedHead
from bonsai.engine.masks import UnitMasks
from bonsai.engine.prefix import BlockPrefix, first_changed_layer
from bonsai.eval.perplexity import model_device
from bonsai.methods.bonsai.priors import NEEDS_ACTIVATIONS, ActivationStats, unit_prior

if TYPE_CHECKING:
    from bonsai.engine.compensation import Inverse


REFERENCE_TOP_K = 64  # next-token log-probabilities kept per position for the KL utility


@torch.no_grad()
def prior_pass(model: nn.Module, adapter: ArchAdapter, groups: list[GroupKey], windows: torch.Tensor,
               prior: str, batch_size: int, reference: bool = False
               ) -> tuple[dict[GroupKey, np.ndarray], float] | tuple[dict[GroupKey, np.ndarray], float, TopK]:
    """Per-unit prior of every group, and the mean calibration loss of the current model; with `reference`,
    also its next-token distributions on the windows (top-k), which the KL utility compares sub-models to."""
    device = model_device(model)
    head = ChunkedHead(model)
    nll, count = 0.0, 0
    refs = []
    with ActivationStats(adapter, groups if prior in NEEDS_ACTIVATIONS else []) as stats:
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            if reference:
                row_nll, top = head.nll_and_topk(batch, REFERENCE_TOP_K, store=torch.device("cpu"))
                refs.append(top)
            else:
                row_nll = head.nll(batch)
            nll += row_nll.double().sum().item()
            count += batch.shape[0] * (batch.shape[1] - 1)
        tokens = stats.tokens_per_row * len(windows)
        priors = {}
        for key in groups:
            sq = stats.rows(key, "sq").sum(0) if prior in NEEDS_ACTIVATIONS else None
            ab = stats.rows(key, "abs").sum(0) if prior in NEEDS_ACTIVATIONS else None
            priors[key] = unit_prior(prior, adapter, key, sq, ab, tokens).double().numpy()
    if reference:
        ref = TopK(torch.cat([r.logprobs for r in refs]), torch.cat([r.ids for r in refs]), torch.cat([r.tail for r in refs]))
        return priors, nll / count, ref
    return priors, nll / count


class SubModelEvaluator:
    """Evaluates U = -(mean LM loss) of sub-models given as per-group unit masks, or with a `reference`
    U = -(mean KL from the current model's next-token distributions)."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, groups: list[GroupKey], windows: torch.Tensor,
                 full_masks: dict[GroupKey, torch.Tensor], batch_size: int, prior: str | None = None,
                 compensation: dict[GroupKey, Inverse] | None = None,
                 candidates: dict[GroupKey, torch.Tensor] | None = None, reference: TopK | None = None,
                 reuse_prefix: bool = True):
        """`reuse_prefix`: start each sub-model's forward at its first changed block, from the current model's
        states there (`bonsai.engine.prefix`; not when per-sample priors need every block's activations).
        `compensation` (group -> (H^-1[:, C], C, mean), see `bonsai.engine.compensation`) evaluates every sub-model
        with its dropped units compensated; `candidates` (group -> candidate unit indices) then says which
        columns of the full masks those are."""
        self.model, self.adapter, self.groups = model, adapter, groups
        self.windows = windows
        self.full_masks = full_masks  # group -> (n_samples, units) uint8
        self.batch_size = batch_size
        self.prior = prior  # when set, also collect per-sample priors (no-regression ablation)
        self.compensation = compensation
        self.candidates = candidates
        self.reference = reference
        self.device = model_device(model)
        self.head = ChunkedHead(model)
        self.reuse_prefix = reuse_prefix and prior not in NEEDS_ACTIVATIONS
        self._prefix: BlockPrefix | None = None  # kept across calls: chunks of one iteration share it

    def _masks(self):
        if self.compensation is None:
            return UnitMasks(self.adapter, self.groups)
        from bonsai.engine.compensation import CompensatedMasks

        return CompensatedMasks(self.adapter, {k: self.compensation[k] for k in self.groups})

    def _row_masks(self, rows: torch.Tensor) -> dict[GroupKey, torch.Tensor]:
        if self.compensation is None:
            return {k: self.full_masks[k].index_select(0, rows) for k in self.groups}
        return {k: self.full_masks[k].index_select(0, rows)[:, self.candidates[k]] for k in self.groups}

    def _start_at(self, layer: int, masks, windows: torch.Tensor):
        """A context in which the model's forward starts at block `layer` (a no-op for block 0), the kept states
        first advanced there with every sub-model mask off."""
        if layer == 0:
            return nullcontext()
        if self._prefix is None:
            masks.clear()
            self._prefix = BlockPrefix(self.model, self.adapter.layers(), self.windows, self.batch_size)
        if self._prefix.layer != layer:
            masks.clear()
            self._prefix.advance(layer)
        return self._prefix.start_here(windows)

    def _batches(self, samples: list[int]) -> list[tuple[int, list[tuple[int, int]]]]:
        """(first changed layer, (sample, window) pairs) per batch: with prefix reuse, sub-models in the order of
        their first changed layer and a batch never mixing two layers; without, every batch starts at 0."""
        n_win = self.windows.shape[0]
        if not self.reuse_prefix:
            pairs = [(s, w) for s in samples for w in range(n_win)]
            return [(0, pairs[i:i + self.batch_size]) for i in range(0, len(pairs), self.batch_size)]
        start = {s: first_changed_layer(self.full_masks, s, self.adapter.num_layers) for s in samples}
        out = []
        for layer in sorted(set(start.values())):
            pairs = [(s, w) for s in samples if start[s] == layer for w in range(n_win)]
            out += [(layer, pairs[i:i + self.batch_size]) for i in range(0, len(pairs), self.batch_size)]
        return out

    @torch.no_grad()
    def evaluate(self, samples: list[int], on_row: Callable[[], None] | None = None
                 ) -> tuple[np.ndarray, dict[GroupKey, np.ndarray] | None]:
        """Utilities of `samples` and, if a prior is set, each sample's per-unit prior."""
        n_win, seq = self.windows.shape
        nll = np.zeros(len(samples))
        slot = {s: i for i, s in enumerate(samples)}
        collect = self.prior in NEEDS_ACTIVATIONS
        sample_sq = {k: None for k in self.groups} if collect else None
        sample_abs = {k: None for k in self.groups} if collect else None
        masks = self._masks()
        # registered after the masks, so the statistics see the sub-model's (masked) activations
        stats = ActivationStats(self.adapter, self.groups) if collect else None
        try:
            for layer, chunk in self._batches(samples):
                rows = torch.tensor([s for s, _ in chunk])
                w = torch.tensor([w for _, w in chunk])
                batch = self.windows[w].to(self.device)
                start = self._start_at(layer, masks, w)
                masks.set(self._row_masks(rows))
                with start:
                    if self.reference is None:
                        row_nll = self.head.nll(batch).double().cpu().numpy()
                    else:
                        ref = TopK(self.reference.logprobs[w], self.reference.ids[w], self.reference.tail[w])
                        row_nll = self.head.kl(batch, ref).double().cpu().numpy()
                for (s, _), v in zip(chunk, row_nll, strict=True):
                    nll[slot[s]] += v
                if collect:
                    idx = torch.tensor([slot[s] for s, _ in chunk])
                    for k in self.groups:
                        sq, ab = stats.sq[k].pop(), stats.abs[k].pop()
                        if sample_sq[k] is None:
                            sample_sq[k] = torch.zeros(len(samples), sq.shape[-1], dtype=torch.float64)
                            sample_abs[k] = torch.zeros(len(samples), sq.shape[-1], dtype=torch.float64)
                        sample_sq[k].index_add_(0, idx, sq.double())
                        sample_abs[k].index_add_(0, idx, ab.double())
                if on_row is not None:
                    for _ in chunk:
                        on_row()
        finally:
            masks.remove()
            if stats is not None:
                stats.remove()
        utility = -nll / (n_win * (seq - 1))
        per_sample_prior = None
        if self.prior is not None:
            per_sample_prior = {}
            for k in self.groups:
                vals = []
                for i in range(len(samples)):
                    sq = sample_sq[k][i].float() if collect else None
                    ab = sample_abs[k][i].float() if collect else None
                    vals.append(unit_prior(self.prior, self.adapter, k, sq, ab, n_win * seq).double().numpy())
                per_sample_prior[k] = np.stack(vals)
        return utility, per_sample_prior
