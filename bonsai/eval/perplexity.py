"""Language-model loss and perplexity over token windows, accumulated in float32/float64."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class NllResult:
    nll_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll_sum / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if math.isfinite(self.loss) else float("inf")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batch_nll(model: nn.Module, batch: torch.Tensor, head=None) -> torch.Tensor:
    """Summed next-token NLL of each row of `batch`, in float32 whatever the model dtype, from the head a chunk of
    positions at a time (`bonsai.engine.logits`; pass one `head` for many batches)."""
    from bonsai.engine.logits import ChunkedHead

    return (head or ChunkedHead(model)).nll(batch.to(model_device(model)))


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               on_batch: Callable[[int], None] | None = None) -> NllResult:
    """NLL of every next-token prediction in the windows (seqlen-1 per window)."""
    from bonsai.engine.logits import ChunkedHead

    device = model_device(model)
    head = ChunkedHead(model)
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        total += batch_nll(model, batch, head).double().sum().item()
        if on_batch is not None:
            on_batch(batch.shape[0])
    return NllResult(nll_sum=total, tokens=windows.shape[0] * (windows.shape[1] - 1))
