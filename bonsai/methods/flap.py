"""FLAP (An et al., AAAI 2024): fluctuation-based adaptive structured pruning, forward passes only.

One forward pass of the dense model over calibration windows gives, at the input of each output projection
(o_proj/dense, down_proj/fc2), every column's mean and variance over tokens. Per column c of a layer:

    attention: (var_c * ||W[:, c]||^2)^2     MLP: var_c * ||W[:, c]||^2        (FLAP's "WIFV" metric)

Each layer's column scores are standardised ((x - mean) / std over that layer's columns of that kind), an
attention unit takes the mean of its columns, and one global threshold across attention and MLP removes
the lowest units until the target parameters are gone (FLAP's adaptive "AL-AM" structure; real parameter
counts per unit). FLAP's own compensation is `--reconstruct bias` (the removed columns' mean input folded
into the output bias); bonsai's default `lstsq` refit is also available, as for every structured method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bonsai.adapters.base import ATTENTION, ArchAdapter, GroupKey
from bonsai.engine.selection import select_removals
from bonsai.engine.statistics import InputMoments
from bonsai.engine.selection import check_reachable
from bonsai.progress import console
from bonsai.methods.registry import register_method


@dataclass
class FlapSettings:
    """FLAP has no settings of its own: its compensation is --reconstruct bias, its structure --allocation."""

    PANEL = "FLAP (--method flap)"



def column_metric(weight: torch.Tensor, variance: torch.Tensor, kind: str) -> torch.Tensor:
    """FLAP's WIFV score of every input column of an output projection."""
    score = variance.double() * weight.detach().double().pow(2).sum(0)
    return score.pow(2) if kind == ATTENTION else score


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one layer's columns (std 1 when they are all equal)."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


@torch.no_grad()
def flap_scores(model, adapter: ArchAdapter, keys: list[GroupKey], windows: torch.Tensor, batch_size: int,
                progress=None) -> dict[GroupKey, np.ndarray]:
    """Standardised FLAP score of every unit of `keys` (higher = keep), from one dense forward pass."""
    linears = {k: adapter.output_projection(k) for k in keys}
    with InputMoments(linears) as moments:
        device = next(model.parameters()).device
        task = progress.add_task("flap statistics", total=len(windows), info="forward") if progress else None
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            model(batch, use_cache=False, logits_to_keep=1)  # statistics only: no logits over the vocabulary
            if task is not None:
                progress.advance(task, batch.shape[0])
    scores = {}
    for key in keys:
        if adapter.group_size(key) == 0:
            scores[key] = np.zeros(0)
            continue
        per_column = standardise(column_metric(linears[key].weight, moments.variance(key), key.kind))
        width = adapter.unit_width(key)
        scores[key] = per_column.view(-1, width).mean(1).cpu().numpy()
    return scores


def flap_removals(scores: dict[GroupKey, np.ndarray], adapter: ArchAdapter, target_params: float
                  ) -> dict[GroupKey, np.ndarray]:
    """One global threshold over the standardised scores, counting each unit's real parameters."""
    keys = list(scores)
    flat = np.concatenate([scores[k] for k in keys])
    params = np.concatenate([np.full(len(scores[k]), adapter.params_per_unit(k)) for k in keys])
    drop = select_removals(flat, np.zeros_like(flat), params, target_params)
    offsets = np.cumsum([0] + [len(scores[k]) for k in keys])
    return {k: drop[(drop >= offsets[j]) & (drop < offsets[j + 1])] - offsets[j] for j, k in enumerate(keys)}


def prune_step(run, windows, block_before: int, progress) -> dict:
    """`--method flap`: WIFV scores, standardised per layer, removed under one global threshold (or the same
    count per layer), through the shared refit."""
    cfg, adapter = run.cfg, run.adapter
    keys = adapter.groups(cfg.unit_kinds)
    check_reachable(cfg.sparsity, sum(adapter.group_size(k) * adapter.params_per_unit(k) for k in keys), block_before,
                    f"flap with --units {cfg.units}")
    console.print(f"FLAP: fluctuation metric (WIFV), per-layer standardisation, "
                  f"{'the same count per layer' if cfg.allocation == 'uniform' else 'one global threshold'}; "
                  f"compensation: --reconstruct {cfg.reconstruct}")
    scores = flap_scores(run.model, adapter, keys, windows, cfg.batch_size, progress)
    target = cfg.sparsity * block_before
    if cfg.allocation == "uniform":  # FLAP's UL-UM: the same count per layer, each layer's lowest scores
        run.check_uniform(keys)
        drops = run.uniform_drops(scores, target)
    elif run.multiples():
        drops = run.global_in_multiples(scores, target)
    else:
        drops = flap_removals(scores, adapter, target)
    return run.remove(drops, progress)


# calibration: the paper's (1024 x 128)
register_method("flap", "bonsai.methods.one_shot:OneShotRun",
                "FLAP (An et al., 2024): fluctuation of each column's input, one global threshold; forward only",
                step=prune_step, structured=True,
                calibration={"calib_samples": 1024, "seqlen": 128})(FlapSettings)
