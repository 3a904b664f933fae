"""Virtual sub-models: zero the contribution of dropped units without touching the weights.

A forward pre-hook on each group's output projection (o_proj/dense, down_proj/fc2) multiplies its
input columns by the unit mask. Swapping sub-models means swapping a small tensor, and masks can differ
per batch row, so several sub-models can share one batched forward.
"""

from __future__ import annotations

import torch

from bonsai.adapters.base import ArchAdapter, GroupKey
from bonsai.engine.hooks import PreHooks


class UnitMasks(PreHooks):
    """Hooks that apply 0/1 unit masks to a live model. Use as a context manager or call `remove()`."""

    def __init__(self, adapter: ArchAdapter, groups: list[GroupKey] | None = None):
        self.adapter = adapter
        self.groups = list(groups) if groups is not None else adapter.groups()
        self._columns: dict[GroupKey, torch.Tensor | None] = {}
        super().__init__({key: adapter.output_projection(key) for key in self.groups})

    def set(self, masks: dict[GroupKey, torch.Tensor | None]) -> None:
        """Masks per group: shape (units,) for the whole batch or (batch, units) per row; None = keep all."""
        for key, mask in masks.items():
            if mask is None:
                self._columns[key] = None
                continue
            lin = self.adapter.output_projection(key)
            width = self.adapter.unit_width(key)
            mask = torch.as_tensor(mask)
            if mask.shape[-1] * width != lin.in_features:
                raise ValueError(f"mask for group {key} has {mask.shape[-1]} units, layer has {lin.in_features // width}")
            self._columns[key] = mask.to(device=lin.weight.device, dtype=lin.weight.dtype).repeat_interleave(width, -1)

    def clear(self) -> None:
        self._columns.clear()

    def _hook(self, key: GroupKey, module, args):
        columns = self._columns.get(key)
        if columns is None:
            return None
        x = args[0]
        if columns.dim() == 2:  # one mask per batch row
            columns = columns.view(columns.shape[0], *([1] * (x.dim() - 2)), columns.shape[1])
        return (x * columns, *args[1:])

    def remove(self) -> None:
        super().remove()
        self._columns.clear()
