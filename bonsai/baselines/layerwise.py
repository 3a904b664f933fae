"""Block-by-block execution for the reconstruction-style baselines (Wanda, BESA).

The model's own forward is run up to the first decoder block, where a pre-hook captures the hidden
states and every keyword argument the model passes its blocks (position embeddings, masks ...). Each
block can then be run on its own with those arguments, so only one block's activations (plus the
calibration hidden states) are needed at a time, and no module name beyond the adapter's `layers()`
is ever used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


class _Stop(Exception):
    pass


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., columns) -> (tokens, columns); also for zero columns (an emptied layer), where reshape(-1, 0) fails."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


@dataclass
class BlockInputs:
    """Hidden states entering a block, per calibration batch, and the keyword arguments of each batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int,
                         store_device: torch.device | None = None) -> BlockInputs:
    device = next(model.parameters()).device
    hidden, kwargs = [], []

    def hook(module, args, kw):
        hidden.append(args[0].to(store_device or args[0].device))
        kwargs.append(dict(kw))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            try:
                model(windows[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [run_block(block, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs, strict=True)]


def block_linears(block: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The block's linear layers whose last name component is one of `names` (the adapter's list)."""
    return {n: m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names and m.weight.numel() > 0}


class InputNorms:
    """Running sum over tokens of x_j^2 for every input column j of some linears (Wanda's ||X_j||_2^2)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sq = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
                   for n, m in linears.items()}
        self.tokens = 0
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = as_rows(args[0].detach())
            self.sq[name] += x.double().pow(2).sum(0)
        return hook

    def norms(self) -> dict[str, torch.Tensor]:
        return {n: v.sqrt().float() for n, v in self.sq.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class InputMoments:
    """Per-column sum and sum of squares over tokens at the input of some linears (mean and variance)."""

    def __init__(self, linears: dict):
        self.sum, self.sq, self.tokens = {}, {}, {}
        self._handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in linears.items()]

    def _hook(self, key):
        def hook(module, args):
            x = args[0].detach()
            x = as_rows(x).double()
            if key not in self.sum:
                self.sum[key] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
                self.sq[key] = torch.zeros_like(self.sum[key])
                self.tokens[key] = 0
            self.sum[key] += x.sum(0)
            self.sq[key] += x.pow(2).sum(0)
            self.tokens[key] += x.shape[0]
        return hook

    def mean(self, key) -> torch.Tensor:
        return self.sum[key] / max(self.tokens[key], 1)

    def variance(self, key) -> torch.Tensor:
        """Population variance of each column over the tokens seen."""
        mean = self.mean(key)
        return (self.sq[key] / max(self.tokens[key], 1) - mean.pow(2)).clamp_min(0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
