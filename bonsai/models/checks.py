"""Checks on a loaded parent before any work starts, so a damaged model is refused in one line."""

from __future__ import annotations

import torch
from torch import nn

from bonsai.errors import BonsaiError


def check_finite(model: nn.Module, name: str) -> None:
    """Refuse a model whose weights hold NaN or inf (a damaged download or a diverged finetune): every
    statistic, sub-model loss and refit computed from it would be NaN."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.is_floating_point() and p.device.type != "meta" and not _finite(p):
                bad = int((~torch.isfinite(p)).sum())
                raise BonsaiError(f"the weights of {name} hold {bad} NaN/inf values (first in {pname}); "
                                  "the model is damaged: re-download or re-create it")


SLICE = 1 << 22  # values per slice: whole-tensor checks of a 262k-token embedding hold GBs of temporaries


def _slices(p: torch.Tensor, chunk: int = SLICE):
    """The tensor's values as flat slices of `chunk`, so that a check's temporaries stay the size of a slice."""
    flat = p.detach().reshape(-1)
    return (flat[i:i + chunk] for i in range(0, flat.numel(), chunk))


def _finite(p: torch.Tensor) -> bool:
    """Whether every value is finite, a slice at a time: `torch.isfinite` of Gemma-3's 671 MB embedding at once
    held 760 MB of temporaries, more than a forward pass of the whole model."""
    return all(bool(torch.isfinite(part).all()) for part in _slices(p))


def count_nonzero(p: torch.Tensor) -> int:
    """Non-zero values of a tensor, a slice at a time: `(p != 0).sum()` of Gemma-3's embedding makes its 168M-value
    mask int64 first, 1.3 GB, twice the memory of the rest of a baseline's run."""
    return sum(int(torch.count_nonzero(part)) for part in _slices(p))
