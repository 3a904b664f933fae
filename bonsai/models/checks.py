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
            if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise BonsaiError(f"the weights of {name} hold {bad} NaN/inf values (first in {pname}); "
                                  "the model is damaged: re-download or re-create it")
