"""LLM-Pruner (Ma et al., 2023): structured pruning by gradient (Taylor) importance of coupled groups.

Discovery: the coupled groups are bonsai's units, from the adapters: an attention unit (under GQA a
key/value group with its query heads) owns rows of q/k/v and columns of the output projection; an MLP
channel owns rows of gate/up (fc1) and a column of down (fc2).
Estimation, per weight element w with gradient g of the calibration LM loss:
  vector   : |sum_{structure} g*w|                         (vector-wise, first order)
  element1 : sum_{structure} |g*w|                          (element-wise, first order; LLM-Pruner's default)
  element2 : sum_{structure} |g*w - 1/2 F w^2|              (with the Fisher diagonal F = mean_j g_j^2 over
                                                             calibration samples j, the second-order term)
then aggregated over the structures of a group by sum, prod, max or last (the output projection).
Pruning: a uniform ratio per layer over a layer range (by default the first and last layers are kept),
or one global ranking counting real parameters (`--global`).

This needs backward passes: gradients of every block weight (and, for element2, a Fisher buffer of the
same size) are held at once, which is the memory Bonsai avoids; `report.json` records the peak.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bonsai.adapters import GroupKey
from bonsai.adapters.base import ArchAdapter
from bonsai.errors import BonsaiError
from bonsai.engine.selection import check_reachable
from bonsai.progress import console
from bonsai.methods.registry import option, register_method

IMPORTANCES = ("vector", "element1", "element2")
AGGREGATIONS = ("sum", "prod", "max", "last")


@dataclass
class LLMPrunerSettings:
    PANEL = "LLM-Pruner (--method llm-pruner)"

    llmp_importance: str = option("element1", "llm-pruner: vector | element1 (default) | element2.")
    llmp_aggregation: str = option("sum", "llm-pruner: sum | prod | max | last.")
    llmp_layer_start: int | None = option(None, "llm-pruner: first layer pruned.")
    llmp_layer_end: int | None = option(None, "llm-pruner: layer after the last pruned.")
    global_ranking: bool = option(False, "llm-pruner: one global ranking instead of uniform.", "--global")

    def check(self) -> None:
        if self.method != "llm-pruner":
            return
        if self.llmp_importance not in IMPORTANCES:
            raise BonsaiError(f"unknown --llmp-importance {self.llmp_importance!r}: choose from {', '.join(IMPORTANCES)}")
        if self.llmp_aggregation not in AGGREGATIONS:
            raise BonsaiError(f"unknown --llmp-aggregation {self.llmp_aggregation!r}: "
                              f"choose from {', '.join(AGGREGATIONS)}")



def default_layer_range(num_layers: int) -> tuple[int, int]:
    """LLM-Pruner's LLaMA-7B setting [4, 30) of 32 layers, scaled; always keeps the first and last layer."""
    start = max(1, round(num_layers * 4 / 32))
    end = min(num_layers - 1, round(num_layers * 30 / 32))
    if end <= start:
        start, end = 0, num_layers
    return start, end


def gradients(model, weights: list[torch.nn.Parameter], windows: torch.Tensor, batch_size: int,
              fisher: bool, progress=None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Gradient of the mean LM loss over all windows, and optionally the Fisher diagonal mean_j g_j^2
    with g_j the gradient of window j's own mean loss. The head is differentiated a chunk of positions at a time
    (`bonsai.engine.logits`): the gradient buffers are the memory LLM-Pruner needs beyond inference, not the logits."""
    from bonsai.engine.logits import ChunkedHead

    device = next(model.parameters()).device
    head = ChunkedHead(model)
    n, predictions = windows.shape[0], windows.shape[1] - 1
    fish = None
    passes = (n if fisher else 0) + -(-n // batch_size)
    task = progress.add_task("gradient passes", total=passes, info="backward") if progress else None

    def advance() -> None:
        if task is not None:
            progress.advance(task)

    if fisher:
        fish = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
        for j in range(n):
            grads, _ = head.nll_grad(windows[j:j + 1].to(device), weights, scale=1.0 / predictions)
            for acc, g in zip(fish, grads, strict=True):
                acc.add_(g.float().pow(2), alpha=1.0 / n)
            advance()
    # float32 weights accumulate in their own .grad (one set of buffers, the size of the pruned blocks); half-precision
    # ones in float32 buffers beside each batch's gradients
    in_place = all(w.dtype == torch.float32 for w in weights)
    saved = [w.grad for w in weights]
    for w in weights:
        w.grad = None
    total = None if in_place else [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    try:
        for start in range(0, n, batch_size):
            batch = windows[start:start + batch_size].to(device)
            grads, _ = head.nll_grad(batch, weights, scale=1.0 / (n * predictions), accumulate=in_place)  # the mean
            for acc, g in zip(total or [], grads or [], strict=True):
                acc.add_(g.float())
            del grads
            advance()
        if in_place:
            total = [w.grad if w.grad is not None else torch.zeros_like(w) for w in weights]
    finally:
        for w, g in zip(weights, saved, strict=True):
            w.grad = g
    return total, fish


def structure_scores(weight: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor | None, dim: int, width: int,
                     importance: str) -> torch.Tensor:
    """One score per unit for one weight: the unit owns `width` consecutive slices along `dim`."""
    w = weight.detach().float()
    gw = grad * w
    if importance == "vector":
        per_elem, reduce_abs = gw, True
    elif importance == "element1":
        per_elem, reduce_abs = gw.abs(), False
    else:
        per_elem, reduce_abs = (gw - 0.5 * fisher * w * w).abs(), False
    if dim == 1:
        per_elem = per_elem.t()
    per_unit = per_elem.reshape(per_elem.shape[0] // width, -1).sum(1)
    return per_unit.abs() if reduce_abs else per_unit


def aggregate(scores: list[torch.Tensor], how: str) -> torch.Tensor:
    stacked = torch.stack(scores)
    if how == "sum":
        return stacked.sum(0)
    if how == "prod":
        return stacked.double().prod(0).float()
    if how == "max":
        return stacked.max(0).values
    return stacked[-1]  # last: the output projection, the last structure executed


def group_importance(model, adapter: ArchAdapter, keys: list[GroupKey], windows: torch.Tensor, batch_size: int,
                     importance: str, aggregation: str, progress=None) -> dict[GroupKey, np.ndarray]:
    """Importance of every unit of `keys` (higher = keep)."""
    if importance not in IMPORTANCES:
        raise BonsaiError(f"unknown --llmp-importance {importance!r}: choose from {', '.join(IMPORTANCES)}")
    if aggregation not in AGGREGATIONS:
        raise BonsaiError(f"unknown --llmp-aggregation {aggregation!r}: choose from {', '.join(AGGREGATIONS)}")
    empty = [key for key in keys if adapter.group_size(key) == 0]  # emptied earlier: nothing to score or slice
    keys = [key for key in keys if adapter.group_size(key) > 0]
    triples = {key: adapter.unit_weights(key) for key in keys}
    weights = list({id(u.weight): u.weight for ts in triples.values() for u in ts}.values())
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    try:
        grads, fisher = gradients(model, weights, windows, batch_size, importance == "element2", progress)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
    index = {id(w): i for i, w in enumerate(weights)}
    out = {}
    with torch.no_grad():
        for key, ts in triples.items():
            per = [structure_scores(u.part(u.weight), u.part(grads[index[id(u.weight)]]),
                                    None if fisher is None else u.part(fisher[index[id(u.weight)]]),
                                    u.dim, u.width, importance) for u in ts]
            out[key] = aggregate(per, aggregation).cpu().numpy().astype(np.float64)
    out.update({key: np.zeros(0) for key in empty})
    return out


def uniform_removals(importance: dict[GroupKey, np.ndarray], adapter: ArchAdapter, target_params: float,
                     multiple=None, same_per_kind: bool = False, notes: list[str] | None = None
                     ) -> dict[GroupKey, np.ndarray]:
    """The same fraction r of units in every group (each group's lowest importance first), r chosen so that the
    removed parameters reach the target: each group removes round(r x units), rounded to `multiple(group)` units
    it keeps, then the total is brought to the target within one step. A kind whose groups are too coarse for r
    (one key/value group per layer cannot lose 30% of it) gives what its rounding allows, and the groups whose
    ratio stays lowest take up the rest, one step at a time (so the MLP of the same layers takes attention's
    share); an overshoot is handed back by the groups with the highest ratio. `same_per_kind` (uniform
    allocation): every group of a kind moves together, so the result is within one such step of the target.
    What moved between kinds is appended to `notes`."""
    prunable = sum(adapter.group_size(k) * adapter.params_per_unit(k) for k in importance)
    ratio = target_params / prunable if prunable else 1.0
    if ratio >= 1:
        raise BonsaiError("the target sparsity needs more than every unit of the pruned layer range; "
                          "lower --sparsity or widen --llmp-layer-start/--llmp-layer-end")
    keys = [k for k in importance if len(importance[k])]
    size = {k: len(importance[k]) for k in keys}
    params = {k: adapter.params_per_unit(k) for k in keys}
    step = {k: max(1, multiple(k) if multiple is not None else 1) for k in keys}

    def nearest(k: GroupKey) -> int:
        n = int(round(ratio * size[k]))
        if step[k] > 1:  # the kept count rounded to the nearest multiple
            kept = int(round((size[k] - n) / step[k])) * step[k]
            n = size[k] - min(kept, size[k] // step[k] * step[k])
        return n

    # the units that move together: one group, or with `same_per_kind` every group of a kind
    if same_per_kind:
        movers = {kind: [k for k in keys if k.kind == kind] for kind in sorted({k.kind for k in keys})}
    else:
        movers = {k: [k] for k in keys}
    count = {m: nearest(ks[0]) for m, ks in movers.items()}  # same_per_kind: every group of a kind has one size

    def move_params(m) -> int:
        ks = movers[m]
        return sum(min(step[k], size[k]) * params[k] for k in ks)

    def removed() -> float:
        return sum(count[m] * params[k] for m, ks in movers.items() for k in ks)

    def ratio_after(m, delta: int) -> float:
        k = movers[m][0]
        return (count[m] + delta * step[k]) / size[k]

    while removed() < target_params:  # fill: the mover whose ratio stays lowest after one more step
        room = [m for m in movers if count[m] + step[movers[m][0]] <= size[movers[m][0]]]
        if not room:
            break
        m = min(room, key=lambda m: (ratio_after(m, 1), -move_params(m)))
        count[m] += step[movers[m][0]]
    while True:  # hand back: the mover with the highest ratio whose step the overshoot can spare
        excess = removed() - target_params
        back = [m for m in movers if count[m] >= step[movers[m][0]] and move_params(m) <= excess]
        if not back:
            break
        m = max(back, key=lambda m: (ratio_after(m, 0), move_params(m)))
        count[m] -= step[movers[m][0]]
    drops = {}
    for m, ks in movers.items():
        for k in ks:
            drops[k] = np.argsort(importance[k], kind="stable")[:count[m]]
    drops.update({k: np.zeros(0, dtype=np.int64) for k in importance if k not in drops})
    if notes is not None:
        for kind in sorted({k.kind for k in keys}):
            ks = [k for k in keys if k.kind == kind]
            got = sum(len(drops[k]) * params[k] for k in ks) / sum(size[k] * params[k] for k in ks)
            if abs(got - ratio) > 0.01:
                notes.append(f"{kind}: {got:.3f} of its parameters instead of the uniform {ratio:.3f}"
                             + (" (its units are too coarse for that ratio)" if got < ratio else
                                " (taking up what the coarser kind could not give)"))
    return drops


def prune_step(run, windows, block_before: int, progress) -> dict:
    """`--method llm-pruner`: Taylor importance of every unit in the layer range, then a uniform ratio per layer
    (or one global ranking), removed through the shared refit."""
    from bonsai.engine.selection import select_removals

    cfg, adapter = run.cfg, run.adapter
    uniform = cfg.allocation == "uniform"
    if uniform and cfg.global_ranking:
        raise BonsaiError("--global ranks units across layers and --allocation uniform keeps every layer the same "
                          "size: choose one")
    # uniform allocation prunes every layer alike (a stock config); LLM-Pruner's default keeps its first and
    # last layers whole
    start, end = (0, adapter.num_layers) if uniform else default_layer_range(adapter.num_layers)
    start = cfg.llmp_layer_start if cfg.llmp_layer_start is not None else start
    end = cfg.llmp_layer_end if cfg.llmp_layer_end is not None else end
    if uniform and (start, end) != (0, adapter.num_layers):
        raise BonsaiError("--allocation uniform prunes every layer alike; drop --llmp-layer-start/--llmp-layer-end")
    if not 0 <= start < end <= adapter.num_layers:
        raise BonsaiError(f"layer range [{start}, {end}) is not within the model's {adapter.num_layers} layers")
    keys = [k for k in adapter.groups(cfg.unit_kinds) if start <= k.layer < end]
    check_reachable(cfg.sparsity, sum(adapter.group_size(k) * adapter.params_per_unit(k) for k in keys), block_before,
                    f"llm-pruner on layers [{start}, {end}) with --units {cfg.units}")
    console.print(f"LLM-Pruner: {cfg.llmp_importance} Taylor importance, {cfg.llmp_aggregation} aggregation, "
                  f"layers [{start}, {end}), {'global' if cfg.global_ranking else 'uniform per-layer'} ranking"
                  f"{' (--allocation uniform: every layer)' if uniform else ''}")
    importance = group_importance(run.model, adapter, keys, windows, cfg.batch_size, cfg.llmp_importance,
                                  cfg.llmp_aggregation, progress)
    target = cfg.sparsity * block_before
    if cfg.global_ranking and run.multiples():
        drops = run.global_in_multiples(importance, target)
    elif cfg.global_ranking:
        flat = np.concatenate([importance[k] for k in keys])
        params = np.concatenate([np.full(len(importance[k]), adapter.params_per_unit(k)) for k in keys])
        if target > params.sum():
            raise BonsaiError("the target sparsity needs more than every unit of the pruned layer range")
        drop = select_removals(flat, np.zeros_like(flat), params, target)
        offsets = np.cumsum([0] + [len(importance[k]) for k in keys])
        drops = {k: drop[(drop >= offsets[j]) & (drop < offsets[j + 1])] - offsets[j] for j, k in enumerate(keys)}
    else:
        if uniform:
            run.check_uniform(keys)
        drops = run.uniform_drops(importance, target)
    return {"layer_range": [start, end], **run.remove(drops, progress)}


# calibration: the paper's (10 x 128)
register_method("llm-pruner", "bonsai.methods.one_shot:OneShotRun",
                "LLM-Pruner (Ma et al., 2023): gradient (Taylor) importance of coupled units; needs backward passes",
                step=prune_step, structured=True,
                calibration={"calib_samples": 10, "seqlen": 128})(LLMPrunerSettings)
