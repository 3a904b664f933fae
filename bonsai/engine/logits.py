"""Next-token losses without the whole logits tensor: the head applied a slice of the vocabulary at a time.

A plain forward holds batch x tokens x vocabulary logits; a loss over them (log-softmax, the top-k reference,
the KL utility) used to hold three or four more float32 copies. With Gemma's 262,144-token vocabulary that is
1 GiB per 8 x 128 tokens per copy, more than the whole 270M-parameter model. Here the model runs to its final
hidden states (the head only on the last position, `logits_to_keep=1`), and the adapter's `head_logits` turns
them into the float32 logits of `LOGIT_CHUNK_BYTES` worth of vocabulary entries at a time, for every position
at once: log-sum-exps, the target's logit, the top-k and the mass outside a top-k are accumulated across the
slices exactly, so a loss costs one slice beside the hidden states, and the head's weight is read once per
batch (slicing positions instead would read Gemma's 671 MB head once per slice: four times the time).

The head's output on the last position is the model's own check of the adapter: on the first batch the two are
compared, and a model whose head the adapter does not reproduce is scored from its whole logits instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bonsai.engine.divergence import TopK, coarse_kl
from bonsai.errors import BonsaiError

# float32 logits computed at once; a loss over them holds about two more such slices (its exponentials, a mask),
# so this is what the loss adds beside the hidden states
LOGIT_CHUNK_BYTES = 32 << 20


@dataclass
class Scan:
    """What one pass over the vocabulary gives per row: the log-sum-exp, the target's logit, the logits of some ids
    (`top`) and the log-sum-exp of every other entry (`tail`), the top-k logits (`values`) and their ids (`best`)."""

    lse: torch.Tensor | None = None
    target: torch.Tensor | None = None
    top: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    values: torch.Tensor | None = None
    best: torch.Tensor | None = None


class ChunkedHead:
    """Scores of a causal LM's next-token predictions, a slice of the vocabulary at a time (see module doc)."""

    min_slice = 1024  # vocabulary entries a slice has at least (however many rows a batch has)

    def __init__(self, model: nn.Module, chunk_bytes: int = LOGIT_CHUNK_BYTES):
        from bonsai.adapters import get_adapter

        self.model = model
        self.chunk_bytes = chunk_bytes
        try:
            self.adapter = get_adapter(model)
        except BonsaiError:  # an architecture bonsai cannot prune can still be evaluated, from its whole logits
            self.adapter = None
        self._checked = False
        self.vocab = model.get_output_embeddings().weight.shape[0]

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(final hidden states, None), or (None, whole logits) when the head cannot be taken apart."""
        if self.adapter is None:
            return None, self.model(batch, use_cache=False).logits
        seen: dict[str, torch.Tensor] = {}

        def keep(module, args, out):
            seen["hidden"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

        handle = self.model.get_decoder().register_forward_hook(keep)
        try:
            out = self.model(batch, use_cache=False, logits_to_keep=1)
        finally:
            handle.remove()
        hidden = seen["hidden"]
        if not self._checked:
            with torch.no_grad():
                mine = self.adapter.head_logits(hidden[:, -1:]).float()
            theirs = out.logits[:, -1:].detach().float()
            scale = float(theirs.abs().max().clamp_min(1.0))
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-3, atol=1e-4 * scale):
                self.adapter = None
                return None, self.model(batch, use_cache=False).logits
            self._checked = True
        return hidden, None

    def _slices(self, batch: torch.Tensor) -> tuple[int, Callable[[int, int], torch.Tensor], Iterator[tuple[int, int]]]:
        """(rows, logits of vocabulary entries a..b for every predicting position as rows x (b - a) float32, the
        slices (a, b) covering the vocabulary). Rows are the batch's positions that predict a token (all but each
        window's last), row-major."""
        hidden, logits = self._forward(batch)
        rows = batch.shape[0] * (batch.shape[1] - 1)
        if hidden is not None:
            flat = hidden[:, :-1].reshape(rows, hidden.shape[-1])

            def piece(a: int, b: int) -> torch.Tensor:
                return self.adapter.head_logits(flat, a, b).float()
        else:
            flat_logits = logits[:, :-1].reshape(rows, logits.shape[-1])

            def piece(a: int, b: int) -> torch.Tensor:
                return flat_logits[:, a:b].float()
        width = max(self.min_slice, self.chunk_bytes // max(1, rows * 4))
        return rows, piece, ((a, min(self.vocab, a + width)) for a in range(0, self.vocab, width))

    def nll(self, batch: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL of each row (float32)."""
        rows, piece, slices = self._slices(batch)
        targets = batch[:, 1:].reshape(rows)
        scan = self._scan(rows, piece, slices, targets)
        return (scan.lse - scan.target).view(batch.shape[0], -1).sum(1)

    def kl(self, batch: torch.Tensor, reference: TopK, direction: str = "forward") -> torch.Tensor:
        """Summed KL(reference || model) of each row over its next-token predictions (top-k coarsened, float32)."""
        rows, piece, slices = self._slices(batch)
        k = reference.ids.shape[-1]
        ref = TopK(reference.logprobs.reshape(rows, k), reference.ids.reshape(rows, k), reference.tail.reshape(rows))
        scan = self._scan(rows, piece, slices, ids=ref.ids.long())
        whole = k == self.vocab
        kl = coarse_kl(ref.to(scan.lse.device), scan.top - scan.lse[:, None], None if whole else scan.tail - scan.lse,
                       direction)
        return kl.view(batch.shape[0], -1).sum(1)

    def nll_and_topk(self, batch: torch.Tensor, k: int, store: torch.device | None = None
                     ) -> tuple[torch.Tensor, TopK]:
        """Summed NLL of each row, and the model's next-token distributions kept as their top-k (float32
        log-probabilities, ids and the log of the mass outside them, as `teacher_topk`; in `store`). Two passes over
        the vocabulary: the top-k is known only after the first, and the mass outside it is summed in the second
        (never as 1 minus a sum)."""
        rows, piece, slices = self._slices(batch)
        slices = list(slices)
        targets = batch[:, 1:].reshape(rows)
        first = self._scan(rows, piece, slices, targets, k=min(k, self.vocab))
        second = self._scan(rows, piece, slices, ids=first.best)
        shape = (batch.shape[0], batch.shape[1] - 1)
        lse = first.lse
        top = TopK((first.values - lse[:, None]).view(*shape, -1), first.best.view(*shape, -1),
                   (second.tail - lse).view(shape))
        return (lse - first.target).view(shape).sum(1), top if store is None else top.to(store)

    @staticmethod
    def _scan(rows: int, piece, slices, targets: torch.Tensor | None = None, ids: torch.Tensor | None = None,
              k: int = 0) -> Scan:
        """One pass over the vocabulary slices, accumulating per row (see `Scan`)."""
        out = Scan()
        for a, b in slices:
            z = piece(a, b)
            if out.lse is None:
                out.lse = torch.full((rows,), float("-inf"), device=z.device)
                out.target = torch.zeros(rows, device=z.device)
                if ids is not None:
                    ids = ids.to(z.device)
                    out.top = torch.zeros(ids.shape, device=z.device)
                    out.tail = torch.full((rows,), float("-inf"), device=z.device)
            out.lse = torch.logaddexp(out.lse, z.logsumexp(1))
            if targets is not None:
                t = targets.to(z.device)
                inside = (t >= a) & (t < b)
                out.target = torch.where(inside, z.gather(1, (t - a).clamp(0, b - a - 1)[:, None])[:, 0], out.target)
            if ids is not None:
                local = ids - a
                inside = (local >= 0) & (local < b - a)
                spot = local.clamp(0, b - a - 1)
                out.top = torch.where(inside, z.gather(1, spot), out.top)
                hits = torch.zeros_like(z).scatter_add_(1, spot, inside.to(z.dtype)) > 0  # additive: no write races
                out.tail = torch.logaddexp(out.tail, z.masked_fill(hits, float("-inf")).logsumexp(1))
            if k:
                v, i = z.topk(min(k, b - a), dim=1)
                i = i + a
                if out.values is not None:
                    v, i = torch.cat([out.values, v], 1), torch.cat([out.best, i], 1)
                    v, order = v.topk(k, dim=1)
                    i = i.gather(1, order)
                out.values, out.best = v, i
            del z
        return out

    def nll_grad(self, batch: torch.Tensor, weights: list[torch.Tensor], scale: float = 1.0,
                 accumulate: bool = False) -> tuple[list[torch.Tensor] | None, float]:
        """Gradients of `scale` x (summed NLL of the batch) with respect to `weights`, and the summed NLL, with the head
        differentiated a chunk of positions at a time: the graph holds the hidden states and one chunk's logits,
        never the whole batch x tokens x vocabulary (nor its softmax and gradient) at once. `accumulate`: add them to
        the weights' `.grad` instead (no second set of gradient buffers) and return None for them."""
        hidden, logits = self._forward(batch)
        if hidden is None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum")
            if accumulate:
                (loss * scale).backward(inputs=weights)
                return None, float(loss.detach())
            return list(torch.autograd.grad(loss * scale, weights)), float(loss.detach())
        upstream = torch.zeros_like(hidden)
        total, step = 0.0, max(1, self.chunk_bytes // max(1, batch.shape[0] * self.vocab * 4))
        for a in range(0, batch.shape[1] - 1, step):
            b = min(batch.shape[1] - 1, a + step)
            part = hidden[:, a:b].detach().requires_grad_(True)
            logits = self.adapter.head_logits(part).float()
            targets = batch[:, a + 1:b + 1].to(logits.device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            (grad,) = torch.autograd.grad(loss * scale, part)
            upstream[:, a:b] = grad
            total += float(loss.detach())
        if accumulate:
            torch.autograd.backward(hidden, grad_tensors=upstream, inputs=weights)
            return None, total
        return list(torch.autograd.grad(hidden, weights, grad_outputs=upstream)), total


__all__ = ["LOGIT_CHUNK_BYTES", "ChunkedHead"]
