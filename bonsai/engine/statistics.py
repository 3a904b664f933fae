"""Running statistics of the inputs of linear layers, gathered by forward pre-hooks over calibration tokens.

Squared column norms (Wanda), per-column moments (FLAP) and Gram matrices G = sum x x^T (the refit, the unit
errors and the compensated sub-models): one pass, no copy of the activations kept.
"""

from __future__ import annotations

import torch
from torch import nn

from bonsai.adapters.base import GroupKey
from bonsai.engine.blocks import as_rows
from bonsai.engine.hooks import PreHooks


class InputNorms(PreHooks):
    """Running sum over tokens of x_j^2 for every input column j of some linears (Wanda's ||X_j||_2^2)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sq = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
                   for n, m in linears.items()}
        self.tokens = 0
        super().__init__(linears)

    def _hook(self, name: str, module: nn.Linear, args: tuple) -> None:
        x = as_rows(args[0].detach())
        self.sq[name] += x.double().pow(2).sum(0)

    def norms(self) -> dict[str, torch.Tensor]:
        return {n: v.sqrt().float() for n, v in self.sq.items()}


class InputMoments(PreHooks):
    """Per-column sum and sum of squares over tokens at the input of some linears (mean and variance)."""

    def __init__(self, linears: dict):
        self.sum, self.sq, self.tokens = {}, {}, {}
        super().__init__(linears)

    def _hook(self, key, module: nn.Linear, args: tuple) -> None:
        x = as_rows(args[0].detach()).double()
        if key not in self.sum:
            self.sum[key] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.sq[key] = torch.zeros_like(self.sum[key])
            self.tokens[key] = 0
        self.sum[key] += x.sum(0)
        self.sq[key] += x.pow(2).sum(0)
        self.tokens[key] += x.shape[0]

    def mean(self, key) -> torch.Tensor:
        return self.sum[key] / max(self.tokens[key], 1)

    def variance(self, key) -> torch.Tensor:
        """Population variance of each column over the tokens seen."""
        mean = self.mean(key)
        return (self.sq[key] / max(self.tokens[key], 1) - mean.pow(2)).clamp_min(0)


WIDE_GRAM = 4096  # input columns beyond which a CPU keeps a layer's Gram matrix in float32 too


def gram_dtype(device: torch.device, width: int = 0) -> torch.dtype:
    """float64 on CPU (exact enough to test against closed forms); float32 on accelerators (fast, and the
    damping keeps the solve well conditioned), and on a CPU for layers wider than WIDE_GRAM columns: LLaMA-3-8B's
    14,336-wide MLP needs 1.6 GB per float64 matrix and the unit errors hold four, which is more than a 2-layer
    model's own weights."""
    return torch.float64 if device.type == "cpu" and width <= WIDE_GRAM else torch.float32


class GramStats(PreHooks):
    """Running G = sum x x^T, s = sum x and n over tokens at the input of some linears (forward pre-hooks)."""

    def __init__(self, linears: dict[GroupKey, nn.Linear]):
        self.gram: dict[GroupKey, torch.Tensor] = {}
        self.sum: dict[GroupKey, torch.Tensor] = {}
        self.tokens: dict[GroupKey, int] = {}
        super().__init__(linears)

    def _hook(self, key: GroupKey, module: nn.Linear, args) -> None:
        x = args[0].detach()
        x = as_rows(x)
        dtype = gram_dtype(x.device, x.shape[-1])
        xd = x.to(dtype)
        if key not in self.gram:
            self.gram[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
            self.sum[key] = torch.zeros(x.shape[-1], dtype=dtype, device=x.device)
            self.tokens[key] = 0
        self.gram[key].addmm_(xd.t(), xd)
        self.sum[key] += xd.sum(0)
        self.tokens[key] += x.shape[0]
