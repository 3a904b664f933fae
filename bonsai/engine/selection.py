"""Global removal of the lowest-scoring units, counting real parameters (paper Eq. 2), optionally in whole
steps that keep every layer's width a multiple of N, or the same in every layer (uniform allocation)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bonsai.errors import BonsaiError


def select_removals(scores: np.ndarray, tiebreak: np.ndarray, unit_params: np.ndarray, budget: float) -> np.ndarray:
    """Indices to remove: ascending score (ties: lower `tiebreak` first) until >= `budget` parameters.

    The greedy choice overshoots the budget by less than one unit's parameters.
    """
    if budget <= 0 or len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((tiebreak, scores))
    cum = np.cumsum(unit_params[order])
    n = int(np.searchsorted(cum, budget, side="left")) + 1
    return np.sort(order[: min(n, len(order))])


def changed_share(before: np.ndarray, after: np.ndarray, unit_params: np.ndarray) -> float:
    """Parameters removed by exactly one of two removal sets, as a share of those removed by either
    (0: the same decision, 1: disjoint): how much a decision moved between two rounds of sub-models."""
    a = np.zeros(len(unit_params), bool)
    b = np.zeros(len(unit_params), bool)
    a[before], b[after] = True, True
    union = float(unit_params[a | b].sum())
    return float(unit_params[a ^ b].sum()) / union if union > 0 else 0.0


@dataclass
class GroupOrder:
    """One group's units in removal order (cheapest first), for removal in whole steps of `multiple` units.

    `scores[j]` is the score of `units[j]`; only the first `allowed` units are candidates, and a step may start
    only among them (so rounding to a multiple can take at most `multiple - 1` units beyond the candidates).
    """

    units: np.ndarray
    scores: np.ndarray
    unit_params: int
    size: int
    multiple: int
    allowed: int

    def steps(self) -> list[tuple[int, int]]:
        """(start, stop) positions in `units` of each removal step; after each one the group keeps a multiple
        of `multiple` units (or none)."""
        out, kept, start = [], self.size, 0
        while kept > 0 and start < self.allowed:
            target = (kept - 1) // self.multiple * self.multiple  # the next multiple below
            stop = start + kept - target
            out.append((start, stop))
            start, kept = stop, target
        return out


def select_in_multiples(groups: list[GroupOrder], budget: float) -> list[np.ndarray]:
    """Units to remove per group, in whole steps (each group keeps a multiple of its `multiple`), cheapest step
    first by its mean score, until `budget` parameters are gone. The overshoot is less than one step."""
    import heapq

    steps = [g.steps() for g in groups]
    taken = [0] * len(groups)
    heap = []
    for i, g in enumerate(groups):
        if steps[i]:
            a, b = steps[i][0]
            heapq.heappush(heap, (float(np.mean(g.scores[a:b])), i))
    removed = 0.0
    while heap and removed < budget:
        _, i = heapq.heappop(heap)
        g = groups[i]
        a, b = steps[i][taken[i]]
        removed += (b - a) * g.unit_params
        taken[i] += 1
        if taken[i] < len(steps[i]):
            a, b = steps[i][taken[i]]
            heapq.heappush(heap, (float(np.mean(g.scores[a:b])), i))
    return [np.sort(g.units[: steps[i][taken[i] - 1][1]]) if taken[i] else np.zeros(0, dtype=np.int64)
            for i, g in enumerate(groups)]


def uniform_options(groups: dict[str, list[GroupOrder]], budget: float, cost_per_param: bool,
                    remaining: float | None = None) -> list[tuple[float, dict[str, int]]]:
    """Every pair of step counts per kind (attention, mlp) that reaches `budget` with the fewest steps of the
    second kind, as (summed cost, steps per kind), cheapest first (a unit's cost: its score, times its parameters
    when scores are per parameter). Empty when the budget cannot be reached. Every group of a kind must have
    the same size and multiple, so each kind's step is taken in every group at once.

    `remaining`: the parameters left to remove before the run's target. An option that would overshoot it by more
    than the closest option does, plus one step of the finer kind, is dropped: a coarse step (a model's one key/value
    group per layer) may serve an early iteration, whose overshoot the next ones take back, but never the last."""
    kinds = list(groups)
    options = {}
    for kind in kinds:
        gs = groups[kind]
        n_steps = min(len(g.steps()) for g in gs) if gs else 0
        costs, params = [0.0], [0.0]
        for j in range(n_steps):
            a, b = gs[0].steps()[j]
            unit_cost = [float(np.sum(g.scores[a:b]) * (g.unit_params if cost_per_param else 1)) for g in gs]
            costs.append(costs[-1] + sum(unit_cost))
            params.append(params[-1] + sum((b - a) * g.unit_params for g in gs))
        options[kind] = (costs, params)
    out = []
    first, *rest = kinds
    second = rest[0] if rest else None
    for i in range(len(options[first][0])):
        cost, got = options[first][0][i], options[first][1][i]
        j = 0
        if second is not None:
            c2, p2 = options[second]
            while j < len(p2) - 1 and got + p2[j] < budget:
                j += 1
            cost, got = cost + c2[j], got + p2[j]
        if got >= budget:
            out.append((cost, got, {first: i, **({second: j} if second is not None else {})}))
    if remaining is not None and out:
        steps = [p[1] for _, p in options.values() if len(p) > 1]
        fine = min(steps) if steps else 0.0
        closest = min(max(0.0, got - remaining) for _, got, _ in out)
        out = [o for o in out if o[1] - remaining <= closest + fine]
    out.sort(key=lambda o: o[0])  # stable: equal costs keep the fewer steps of the first kind
    return [(cost, counts) for cost, _, counts in out]


def check_reachable(sparsity: float, prunable_params: int, block_params: int, rule: str) -> None:
    """Stop before any work when `sparsity` of the block parameters is more than the units this method may remove
    (`prunable_params`, under `rule`, e.g. "--units attention") can give, naming the largest reachable sparsity."""
    reachable = prunable_params / block_params if block_params else 0.0
    if sparsity * block_params >= prunable_params:
        raise BonsaiError(f"--sparsity {sparsity} cannot be reached: {rule} can remove at most {reachable:.4f} of the "
                          f"block parameters (every unit it may touch); choose --sparsity below {reachable:.4f}")
