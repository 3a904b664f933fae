"""Module-level priors rho (paper Appendix F), registered by name.

Activation statistics are captured by forward pre-hooks at each group's output projection input (the
same point where masks act), per batch row, so they can also be aggregated per sub-model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bonsai.adapters.base import ArchAdapter, GroupKey
from bonsai.engine.hooks import PreHooks

PRIORS: dict[str, Callable] = {}
NEEDS_ACTIVATIONS = {"wanda", "activation"}
# computed from each group's Gram matrix by `bonsai.engine.compensation.group_statistics`, not by these hooks
NEEDS_GRAM = {"obs"}


def register_prior(name: str):
    def deco(fn):
        PRIORS[name] = fn
        return fn
    return deco


class ActivationStats(PreHooks):
    """Per-row sums of x^2 and |x| over tokens at each group's output-projection input."""

    def __init__(self, adapter: ArchAdapter, groups: list[GroupKey]):
        self.adapter = adapter
        self.groups = groups
        self.sq: dict[GroupKey, list[torch.Tensor]] = {k: [] for k in groups}
        self.abs: dict[GroupKey, list[torch.Tensor]] = {k: [] for k in groups}
        self.tokens_per_row = 0
        super().__init__({k: adapter.output_projection(k) for k in groups})

    def _hook(self, key: GroupKey, module, args):
        x = args[0].float()
        # explicit token count: an emptied group has zero columns, where reshape(-1) would be ambiguous
        x = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])
        self.tokens_per_row = x.shape[1]
        self.sq[key].append(x.pow(2).sum(1).cpu())
        self.abs[key].append(x.abs().sum(1).cpu())

    def rows(self, key: GroupKey, which: str) -> torch.Tensor:
        """(rows seen, columns) sums for the group."""
        store = self.sq if which == "sq" else self.abs
        return torch.cat(store[key]) if store[key] else torch.zeros(0)


def _per_unit(values: torch.Tensor, width: int) -> torch.Tensor:
    """Average consecutive column values into unit values (a unit owns `width` columns)."""
    return values.view(*values.shape[:-1], -1, width).mean(-1)


@register_prior("wanda")
def wanda_prior(adapter: ArchAdapter, key: GroupKey, sq: torch.Tensor, absum: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean over output rows of |W_out[:, c]| times the RMS of column c, averaged over the unit's columns."""
    w = adapter.output_projection(key).weight.detach().float().abs().mean(0).cpu()
    rms = (sq / max(tokens, 1)).sqrt()
    return _per_unit(w * rms, adapter.unit_width(key))


@register_prior("activation")
def activation_prior(adapter: ArchAdapter, key: GroupKey, sq: torch.Tensor, absum: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean |activation| of the unit's columns over tokens."""
    return _per_unit(absum / max(tokens, 1), adapter.unit_width(key))


@register_prior("magnitude")
def magnitude_prior(adapter: ArchAdapter, key: GroupKey, sq=None, absum=None, tokens: int = 0) -> torch.Tensor:
    """Mean |w| over every weight the unit owns (input rows and output columns)."""
    total, count = None, 0
    for u in adapter.unit_weights(key):
        dim, width = u.dim, u.width
        w = u.part(u.weight).detach().float().abs()
        w = w if dim == 0 else w.t()
        per_unit = w.reshape(-1, width * w.shape[1]).sum(1).cpu()
        total = per_unit if total is None else total + per_unit
        count += width * w.shape[1]
    return total / count


@register_prior("uniform")
def uniform_prior(adapter: ArchAdapter, key: GroupKey, sq=None, absum=None, tokens: int = 0) -> torch.Tensor:
    return torch.ones(adapter.group_size(key))


# every prior a run may name: the hooks' registry, then those computed from the Gram matrices
PRIOR_NAMES = (*PRIORS, *sorted(NEEDS_GRAM))


def unit_prior(name: str, adapter: ArchAdapter, key: GroupKey, sq: torch.Tensor | None,
               absum: torch.Tensor | None, tokens: int) -> torch.Tensor:
    if name in NEEDS_GRAM:  # placeholder; the runner fills in the compensated errors
        return torch.zeros(adapter.group_size(key))
    return PRIORS[name](adapter, key, sq, absum, tokens)
