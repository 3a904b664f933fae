"""Wanda (Sun et al., 2023): |W_ij| * ||X_j||_2, compared within each output row; forward passes only.

Blocks are processed in order on calibration activations that went through the already-pruned earlier
blocks (as in the Wanda reference code), so memory stays at inference level plus the calibration
hidden states. Output: the same dense shapes with zeros, `unstructured`, `2:4` or `4:8`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bonsai.engine.blocks import block_linears, block_outputs, capture_block_inputs
from bonsai.engine.spill import states_store
from bonsai.engine.statistics import InputNorms
from bonsai.errors import BonsaiError
from bonsai.methods.registry import option, register_method

SPARSITY_TYPES = ("unstructured", "2:4", "4:8")


@dataclass
class WandaSettings:
    PANEL = "Wanda (--method wanda)"

    sparsity_type: str = option("unstructured", "wanda: unstructured | 2:4 | 4:8.", "--sparsity-type")

    def check(self) -> None:
        if self.method == "wanda":
            parse_sparsity_type(self.sparsity_type, self.sparsity)



def parse_sparsity_type(kind: str, sparsity: float) -> tuple[int, int] | None:
    """None for unstructured, else (n pruned, m group) for N:M; the sparsity must then be n/m."""
    if kind == "unstructured":
        return None
    if kind not in SPARSITY_TYPES:
        raise BonsaiError(f"unknown --sparsity-type {kind!r}: choose from {', '.join(SPARSITY_TYPES)}")
    n_keep, m = (int(x) for x in kind.split(":"))
    n_prune = m - n_keep
    if abs(sparsity - n_prune / m) > 1e-9:
        raise BonsaiError(f"--sparsity-type {kind} means sparsity {n_prune / m:g}; got --sparsity {sparsity}")
    return n_prune, m


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 in float32 (input_norms: one value per input column)."""
    return weight.detach().float().abs() * input_norms.float()[None, :]


def prune_mask(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    """True where a weight is removed: the lowest scores of each row (unstructured: floor(sparsity*in)
    per row; N:M: n of every m consecutive inputs)."""
    rows, cols = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_m is None:
        k = int(cols * sparsity)
        if k:
            mask.scatter_(1, scores.argsort(dim=1)[:, :k], True)
        return mask
    n, m = n_m
    if cols % m:
        raise BonsaiError(f"a linear with {cols} inputs cannot take a {m - n}:{m} pattern")
    grouped = scores.view(rows, cols // m, m)
    idx = grouped.argsort(dim=2)[:, :, :n]
    return mask.view(rows, cols // m, m).scatter_(2, idx, True).view(rows, cols)


@torch.no_grad()
def prune_wanda(model, adapter, windows: torch.Tensor, sparsity: float, sparsity_type: str, batch_size: int,
                progress=None) -> list[dict]:
    """Zero weights of every block linear in place; returns per-layer {name: fraction zeroed}."""
    n_m = parse_sparsity_type(sparsity_type, sparsity)
    layers = adapter.layers()
    inputs = capture_block_inputs(model, layers, windows, batch_size, states_store(model, windows.numel()))
    task = progress.add_task("wanda blocks", total=len(layers), info=sparsity_type) if progress else None
    per_layer = []
    for block in layers:
        linears = block_linears(block, adapter.linear_names)
        norms = InputNorms(linears)
        block_outputs(block, inputs)  # statistics of the dense block on already-pruned inputs
        norms.remove()
        stats = {}
        for name, lin in linears.items():
            mask = prune_mask(wanda_scores(lin.weight, norms.norms()[name]), sparsity, n_m)
            lin.weight[mask.to(lin.weight.device)] = 0
            stats[name] = mask.float().mean().item()
        per_layer.append(stats)
        inputs.hidden = block_outputs(block, inputs)  # the next block sees this block's pruned output
        if task is not None:
            progress.advance(task)
    return per_layer


def prune_step(run, windows, block_before: int, progress) -> dict:
    """`--method wanda`: every block linear's lowest |W| x ||X|| of each row set to zero."""
    per_layer = prune_wanda(run.model, run.adapter, windows, run.cfg.sparsity, run.cfg.sparsity_type,
                            run.cfg.batch_size, progress)
    return {"layer_sparsity": [float(np.mean(list(d.values()))) for d in per_layer], "linear_sparsity": per_layer}


# calibration: the paper's (128 x 2048 of C4)
register_method("wanda", "bonsai.methods.one_shot:OneShotRun",
                "Wanda (Sun et al., 2023): |W| x ||X||, weights zeroed per output row (unstructured or N:M)",
                step=prune_step, structured=False,
                calibration={"calib": "c4", "calib_samples": 128})(WandaSettings)
