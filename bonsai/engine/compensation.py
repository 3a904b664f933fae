"""Compensated unit errors and compensated sub-models: selection that sees the refit coming.

The refit of `bonsai.engine.reconstruction` changes which units matter: a unit whose output the others can take
over costs little once the output projection is refit, however large its activations. Two things here
measure units *after* compensation, from the Gram matrix G of each output projection's input (forward
passes only):

* the compensated error of removing unit u alone (structured optimal brain surgeon, with H = G + lambda I):
      e_u = tr(W_u [(H^-1)_uu]^-1 W_u^T)           (W_u: the unit's columns of the output projection)
  expressed relative to the power of the residual stream entering the block, so that groups of different
  layers are on one scale. A run that will not refit (`--reconstruct none`) or only fold the mean into the
  bias (`bias`) scores a unit by the error it leaves then: tr(W_u G_uu W_u^T) with G uncentred or centred
  (the covariance), since no other column will take its output over;
* compensated sub-models: when the units R of a group are dropped, the optimal update of the remaining
  weights is  W' = W - W_R [(H^-1)_RR]^-1 (H^-1)_R,:  (its columns R are zero), so a sub-model's output
  projection computes  W x - (x M_R^T) W_R^T  with  M_R = [(H^-1)_RR]^-1 (H^-1)_R,: . Only the candidates'
  columns of H^-1 are kept, and the correction is a low-rank term per batch row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from bonsai.adapters.base import ArchAdapter, GroupKey
from bonsai.engine import spill
from bonsai.engine.blocks import block_outputs, capture_block_inputs
from bonsai.engine.obs import centred_gram, columns_of, damped_inverse, set_aside, unit_errors
from bonsai.engine.refit import DEFAULT_DAMP, damp_scale
from bonsai.engine.statistics import GramStats, gram_dtype
from bonsai.errors import BonsaiError
from bonsai.runtime import release_memory

# per group: (H^-1[:, C], C, mean input or None), see group_statistics and CompensatedMasks
Inverse = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
# The probes' corrections M_R kept for the next windows of the same sub-model. A probe of p_iter 0.3 drops 60%
# of an MLP: M_R is then 6,605 x 11,008 float32 (290 MB) at LLaMA-2-7B shape, so the cache is bounded by bytes
# (rows of one batch belong to one or two sub-models: a handful of entries is all that is ever reused), at most
# CORRECTION_CACHE_SHARE of the model's own memory (the newest entry always stays).
CORRECTION_CACHE_BYTES = 1 << 30
CORRECTION_CACHE_SHARE = 0.05




@dataclass
class GroupStats:
    """What one group's Gram matrix says about its units (current model, calibration windows)."""

    unit_error: torch.Tensor  # (units,) compensated error of removing each unit alone, relative to residual power


























@torch.no_grad()
def group_statistics(model: nn.Module, adapter: ArchAdapter, groups: list[GroupKey], windows: torch.Tensor,
                     batch_size: int, damp: float = DEFAULT_DAMP, keep_inverse: bool = False, refit: str = "lstsq",
                     sequential: Callable[[GroupKey], int] | None = None,
                     columns: Callable[[GroupKey, torch.Tensor], torch.Tensor] | None = None, progress=None
                     ) -> tuple[dict[GroupKey, GroupStats], dict[GroupKey, Inverse]]:
    """Unit errors of every group under the `refit` to come (compensated for lstsq), block by block on the
    current model (one Gram matrix at a time). With `keep_inverse`, also return per group (H^-1[:, C], C, mean):
    `columns(group, unit_errors)` picks the columns C to keep (default: all), so that only those outlive the
    group's turn (at 7B a whole H^-1 is ~0.5 GB per layer); mean is the input's mean where the layer has a
    bias (the lstsq refit fits it jointly, so errors and compensation are on the covariance), else None.
    `sequential(group)`: units to order by sequential OBS (0: each unit alone)."""

    layers = adapter.layers()
    wanted = {k.layer for k in groups}
    inputs = capture_block_inputs(model, layers, windows, batch_size, spill.states_store(model, windows.numel()))
    # the kept columns wait for the probes in host memory; on a CPU (where that is the memory) in a temporary file
    # once they pass HOST_STATES_SHARE of the model's memory (0.5 GB at Gemma-3-270M shape, 1.9x its budget)
    budget = spill.HOST_STATES_SHARE * sum(p.numel() * p.element_size() for p in model.parameters())
    aside = spill.SpillStore() if next(model.parameters()).device.type == "cpu" else None
    held = 0
    stats: dict[GroupKey, GroupStats] = {}
    inverses: dict[GroupKey, Inverse] = {}
    n_blocks = max(wanted) + 1 if wanted else 0
    task = progress.add_task("unit errors", total=n_blocks, info="Gram, block by block") if progress is not None else None
    for i in range(n_blocks):
        here = [k for k in groups if k.layer == i and adapter.group_size(k) > 0]
        if here:
            residual = sum(float(h.to(gram_dtype(h.device)).pow(2).sum()) for h in inputs.hidden)
            residual = residual if residual > 0 else 1.0
            with GramStats({k: adapter.output_projection(k) for k in here}) as grams:
                outputs = block_outputs(layers[i], inputs)
            for key in here:
                if not all(bool(torch.isfinite(row).all()) for row in grams.gram[key].split(1024)):
                    raise BonsaiError(f"layer {key}: non-finite activation statistics (inf/NaN in the calibration forward "
                                      "pass); nothing was written. Try --dtype float32 or other calibration data")
                raw, mean = grams.gram.pop(key), None  # popped: freed as soon as nothing below needs it
                gram = raw
                lin = adapter.output_projection(key)
                if refit == "lstsq" and lin.bias is not None:  # the refit fits the bias jointly: it takes the mean
                    mean = grams.sum[key] / max(grams.tokens[key], 1)
                    gram = centred_gram(gram, grams.sum[key], grams.tokens[key])
                hinv = None
                if refit == "lstsq" or keep_inverse:  # damped as the refit is, relative to the raw Gram's diagonal
                    hinv = damped_inverse(gram, damp, damp_scale(raw))
                if refit == "lstsq":  # its unit errors need H^-1 alone
                    del gram
                    gram = raw = None
                steps = sequential(key) if sequential is not None else 0
                # one-column units along sequential OBS work on H^-1 itself, one n x n matrix less (LLaMA-3-8B's
                # MLP: 0.8 GB); what the probes need of the original waits outside the working memory
                consume = keep_inverse and refit == "lstsq" and steps > 0 and adapter.unit_width(key) == 1
                original = set_aside(hinv, aside) if consume else None
                err = unit_errors(lin.weight, raw, grams.sum[key], grams.tokens[key], adapter.unit_width(key), refit,
                                  hinv, steps, in_place=consume)
                if consume:
                    hinv = None  # used up by the path
                stats[key] = GroupStats(unit_error=(err / residual).double())
                if keep_inverse:
                    cols = columns(key, stats[key].unit_error) if columns is not None else torch.arange(lin.in_features)
                    # held for the whole iteration (0.6 x n^2 floats per group at p_iter 0.3): in host memory, so
                    # the accelerator keeps inference-level memory; each probe moves its own columns over
                    kept = columns_of(original if consume else hinv, cols)
                    held += kept.numel() * kept.element_size()
                    if aside is not None and held > budget:
                        kept = spill.stash(kept, aside)
                    inverses[key] = (kept, cols, None if mean is None else mean.cpu())
                del hinv, gram, raw, original
            del grams
        else:
            outputs = block_outputs(layers[i], inputs)
        for key in groups:
            if key.layer == i and key not in stats:
                stats[key] = GroupStats(unit_error=torch.zeros(0, dtype=torch.float64))
        inputs.hidden = outputs
        release_memory()  # what this block's statistics freed goes back before the next block's
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return stats, inverses


class CompensatedMasks:
    """Sub-models whose dropped units are compensated by the optimal update of the remaining weights.

    Forward hooks on each group's output projection subtract the low-rank term (x M_R^T) W_R^T per batch
    row, R being the row's dropped candidate columns (see module doc); rows may belong to different
    sub-models. `set` takes, per group, a (rows, candidate units) 0/1 keep matrix over the candidates.
    """

    def __init__(self, adapter: ArchAdapter, inverses: dict[GroupKey, Inverse]):
        """`inverses[group]` = (H^-1[:, C], C, mean) with C the candidate columns in candidate-unit order and
        mean the input's mean when the layer has a bias (None otherwise): the optimal update then also moves the
        bias by W_R M_R mean, so the term acts on x - mean."""
        self.adapter = adapter
        self.inverses = inverses
        model_bytes = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
        self.cache_bytes = min(CORRECTION_CACHE_BYTES, CORRECTION_CACHE_SHARE * model_bytes)
        self._keep: dict[GroupKey, torch.Tensor] = {}
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}  # oldest first
        self._handles = [adapter.output_projection(k).register_forward_hook(partial(self._hook, k)) for k in inverses]

    def set(self, keep: dict[GroupKey, torch.Tensor]) -> None:
        self._keep = {k: torch.as_tensor(v).bool() for k, v in keep.items()}

    def clear(self) -> None:
        """Every group back to the model as it is (until the next `set`)."""
        self._keep = {}

    def _correction(self, key: GroupKey, dropped_units: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(M_R, W_R, M_R mean or None) for the dropped candidate units, cached for the sub-model's next windows."""
        cache_key = (key, dropped_units)
        if cache_key in self._cache:
            self._cache[cache_key] = self._cache.pop(cache_key)  # most recently used last
            return self._cache[cache_key]
        hinv_c, cols, mean = self.inverses[key]
        hinv_c = hinv_c.to("cpu") if not isinstance(hinv_c, torch.Tensor) else hinv_c  # spilled to a file (CPU runs)
        W = self.adapter.output_projection(key).weight
        width = self.adapter.unit_width(key)
        pos = (torch.tensor(dropped_units)[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
        pos = pos.to(hinv_c.device)
        R = cols.to(hinv_c.device)[pos]
        dev = W.device  # the solve runs where the layer runs; H^-1's columns wait in host memory
        h_RR = hinv_c[R][:, pos].to(dev)  # (H^-1)_RR
        M = torch.linalg.solve(h_RR, hinv_c[:, pos].t().to(dev))  # [(H^-1)_RR]^-1 (H^-1)_R,:
        # float32 whatever the model dtype: the term cancels the dropped columns' share of W x
        shift = None if mean is None else (M @ mean.to(dev, M.dtype)).float()  # M_R mean
        entry = (M.float(), W[:, R.to(W.device)].float(), shift)
        del M
        size = lambda e: sum(t.numel() * t.element_size() for t in e if t is not None)  # noqa: E731
        total = size(entry) + sum(size(e) for e in self._cache.values())
        while self._cache and total > self.cache_bytes:
            total -= size(self._cache.pop(next(iter(self._cache))))
        self._cache[cache_key] = entry
        return entry

    def _hook(self, key: GroupKey, module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
        keep = self._keep.get(key)
        if keep is None:
            return output
        x = args[0]
        out = output.clone()
        rows = keep if keep.dim() == 2 else keep[None].expand(x.shape[0], -1)
        for r in range(x.shape[0]):
            dropped = tuple((~rows[r]).nonzero().flatten().tolist())
            if not dropped:
                continue
            M, W_R, shift = self._correction(key, dropped)
            z = x[r].to(M.dtype) @ M.t()
            if shift is not None:
                z = z - shift
            out[r] -= (z @ W_R.t()).to(out.dtype)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()

    def __enter__(self) -> CompensatedMasks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

