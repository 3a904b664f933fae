"""Next-token losses without the whole logits tensor: the head applied a chunk of positions at a time.

A plain forward holds batch x tokens x vocabulary logits; a loss over them (log-softmax, the top-k reference,
the KL utility) used to hold three or four more float32 copies. With Gemma's 262,144-token vocabulary that is
1 GiB per 8 x 128 tokens per copy, more than the whole 270M-parameter model. Here the model runs to its final
hidden states (the head only on the last position, `logits_to_keep=1`), and the adapter's `head_logits` turns
`LOGIT_CHUNK_BYTES` worth of positions at a time into float32 logits, so a loss costs one chunk beside the
hidden states. The head's output on the last position is the model's own check of the adapter: on the first
batch the two are compared, and a model whose head the adapter does not reproduce is scored from its whole
logits instead.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bonsai.errors import BonsaiError
from bonsai.finetune.distill import TopK, teacher_topk, topk_kl

# float32 logits computed at once; a loss over them holds about three more such chunks (log-softmax, the tail of a
# top-k, its exponentials), so this is what the loss adds beside the hidden states
LOGIT_CHUNK_BYTES = 32 << 20


class ChunkedHead:
    """Scores of a causal LM's next-token predictions, a chunk of positions at a time (see module doc)."""

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

    def chunks(self, batch: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, float32 logits of positions start..stop-1) over the positions that predict a token of the
        batch (all but the last)."""
        hidden, logits = self._forward(batch)
        predicting = batch.shape[1] - 1
        step = max(1, self.chunk_bytes // max(1, batch.shape[0] * self.vocab * 4))
        for a in range(0, predicting, step):
            b = min(predicting, a + step)
            if hidden is not None:
                yield a, b, self.adapter.head_logits(hidden[:, a:b]).float()
            else:
                yield a, b, logits[:, a:b].float()

    def nll(self, batch: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL of each row (float32)."""
        total = None
        for a, b, logits in self.chunks(batch):
            targets = batch[:, a + 1:b + 1].to(logits.device)
            part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            part = part.view(batch.shape[0], -1).sum(1)
            total = part if total is None else total + part
        return total

    def kl(self, batch: torch.Tensor, reference: TopK) -> torch.Tensor:
        """Summed KL(reference || model) of each row over its next-token predictions (top-k coarsened, float32)."""
        total = None
        for a, b, logits in self.chunks(batch):
            ref = TopK(reference.logprobs[:, a:b], reference.ids[:, a:b], reference.tail[:, a:b]).to(logits.device)
            part = topk_kl(logits, ref).sum(1)
            total = part if total is None else total + part
        return total

    def nll_and_topk(self, batch: torch.Tensor, k: int, store: torch.device | None = None
                     ) -> tuple[torch.Tensor, TopK]:
        """Summed NLL of each row, and the model's next-token distributions kept as their top-k (in `store`)."""
        total, parts = None, []
        for a, b, logits in self.chunks(batch):
            targets = batch[:, a + 1:b + 1].to(logits.device)
            part = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            part = part.view(batch.shape[0], -1).sum(1)
            total = part if total is None else total + part
            top = teacher_topk(logits, k)
            parts.append(top if store is None else top.to(store))
        return total, TopK(torch.cat([p.logprobs for p in parts], 1), torch.cat([p.ids for p in parts], 1),
                           torch.cat([p.tail for p in parts], 1))

    def nll_grad(self, batch: torch.Tensor, weights: list[torch.Tensor], scale: float = 1.0
                 ) -> tuple[list[torch.Tensor], float]:
        """Gradients of `scale` x (summed NLL of the batch) with respect to `weights`, and the summed NLL, with the head
        differentiated a chunk of positions at a time: the graph holds the hidden states and one chunk's logits,
        never the whole batch x tokens x vocabulary (nor its softmax and gradient) at once."""
        hidden, logits = self._forward(batch)
        if hidden is None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum")
            return list(torch.autograd.grad(loss * scale, weights)), float(loss)
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
            total += float(loss)
        return list(torch.autograd.grad(hidden, weights, grad_outputs=upstream)), total
