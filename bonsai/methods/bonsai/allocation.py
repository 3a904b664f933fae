"""The allocation search (`--search N`): Bonsai's own idea, sampling sub-models and regressing their utility,
applied to how many units each layer group gives up rather than to which units.

The probes price every group alone and add the prices up; the removal then takes every group's share at once.
Here the variables are one removal count per group (2L of them, where the paper regresses on tens of thousands
of units), each sub-model is the whole network with every group's share removed, and the utility is measured:

  sample     allocations around the probes' own, in antithetic pairs (base + d, base - d), every one moved back
             onto the iteration's parameter budget;
  regress    utility on the groups' moves (ridge, its penalty chosen by held-out Kendall tau, as the paper does)
             and step along the fitted gradient, projected onto the budget, at a few lengths;
  evolve     a few rounds of mutations of the best so far that move budget between two groups (EvoPress);
  verify     the best few and the probes' own on fresh windows; the best verified is kept.

Inside a group, units go in the probes' order (by their scores: the compensated errors along sequential OBS).
Nothing here knows about layers or architectures: a group is a ladder of units with a parameter count each.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass
class Ladder:
    """One group's candidates in removal order (cheapest first) and their scores (a unit's measured cost per
    parameter); `reach` of them are what the probes' own allocation may take (the candidate floor), the search
    may take all of them."""

    units: np.ndarray
    scores: np.ndarray
    unit_params: int
    reach: int
    tiebreak: np.ndarray | None = None  # among equal scores, the lower goes first (the units' priors)

    @property
    def size(self) -> int:
        return len(self.units)


def ladders_params(ladders: list[Ladder]) -> np.ndarray:
    return np.array([lad.unit_params for lad in ladders], dtype=np.float64)


def removed_params(counts: np.ndarray, ladders: list[Ladder]) -> float:
    return float(np.dot(counts, ladders_params(ladders)))


def fit_budget(counts: np.ndarray, ladders: list[Ladder], need: float) -> np.ndarray:
    """Counts moved onto the budget: at least `need` parameters removed and less than one unit more. Units are
    added cheapest next first (by score), or given back most expensive last-removed first."""
    counts = np.clip(np.rint(counts).astype(np.int64), 0, [lad.size for lad in ladders])
    got = removed_params(counts, ladders)
    heap = [(float(lad.scores[counts[g]]), g) for g, lad in enumerate(ladders) if counts[g] < lad.size]
    heapq.heapify(heap)
    while got < need and heap:
        _, g = heapq.heappop(heap)
        counts[g] += 1
        got += ladders[g].unit_params
        if counts[g] < ladders[g].size:
            heapq.heappush(heap, (float(ladders[g].scores[counts[g]]), g))
    heap = [(-float(lad.scores[counts[g] - 1]), g) for g, lad in enumerate(ladders) if counts[g] > 0]
    heapq.heapify(heap)
    while heap:
        _, g = heapq.heappop(heap)
        if got - ladders[g].unit_params < need:
            continue  # this group's unit is too large to give back; a smaller one may still fit
        counts[g] -= 1
        got -= ladders[g].unit_params
        if counts[g] > 0:
            heapq.heappush(heap, (-float(ladders[g].scores[counts[g] - 1]), g))
    return counts


def _budget_direction(ladders: list[Ladder]) -> np.ndarray:
    """The parameters a whole pool holds per group: a move z (in shares of each pool) keeps the budget when it is
    orthogonal to this."""
    return np.array([lad.unit_params * lad.size for lad in ladders], dtype=np.float64)


def _on_budget(z: np.ndarray, a: np.ndarray) -> np.ndarray:
    return z - (z @ a) / max(float(a @ a), 1e-300) * a


def sample_allocations(base: np.ndarray, ladders: list[Ladder], pairs: int, scale: float, need: float,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """`pairs` antithetic pairs around `base`: each group's move a normal share (std `scale`) of its pool,
    projected onto the budget, added and subtracted; then rounded and fitted to the budget."""
    sizes = np.array([lad.size for lad in ladders], dtype=np.float64)
    a = _budget_direction(ladders)
    out = []
    for _ in range(pairs):
        d = _on_budget(rng.normal(size=len(ladders)) * scale, a) * sizes
        out += [fit_budget(base + d, ladders, need), fit_budget(base - d, ladders, need)]
    return out


def shares(counts: np.ndarray, base: np.ndarray, ladders: list[Ladder]) -> np.ndarray:
    """An allocation as the regression sees it: each group's move from `base`, in shares of its pool."""
    sizes = np.array([max(lad.size, 1) for lad in ladders], dtype=np.float64)
    return (np.asarray(counts, dtype=np.float64) - base) / sizes


def gradient_steps(base: np.ndarray, beta: np.ndarray, ladders: list[Ladder], scale: float, need: float,
                   lengths: tuple[float, ...] = (0.5, 1.0, 2.0)) -> list[np.ndarray]:
    """Allocations along the fitted utility gradient `beta` (per share of each pool), projected onto the budget,
    of root-mean-square move `length x scale`."""
    z = _on_budget(np.asarray(beta, dtype=np.float64), _budget_direction(ladders))
    rms = float(np.sqrt(np.mean(z ** 2)))
    if not np.isfinite(rms) or rms == 0:
        return []
    sizes = np.array([lad.size for lad in ladders], dtype=np.float64)
    return [fit_budget(base + z / rms * scale * length * sizes, ladders, need) for length in lengths]


def mutations(best: np.ndarray, ladders: list[Ladder], n: int, scale: float, need: float,
              rng: np.random.Generator) -> list[np.ndarray]:
    """`n` offspring of `best`, each moving budget between two groups: one gives up about |N(0, scale)| of the
    smaller of their pools (in parameters, at least one unit of the coarser group) more, the other as much less."""
    g_count = len(ladders)
    can_give = [g for g, lad in enumerate(ladders) if best[g] < lad.size]  # may remove more
    can_take = [g for g in range(g_count) if best[g] > 0]  # may remove less
    out = []
    if not can_give or not can_take or len(set(can_give) | set(can_take)) < 2:
        return out
    while len(out) < n:
        up, down = int(rng.choice(can_give)), int(rng.choice(can_take))
        if up == down:
            continue
        p_up, p_down = ladders[up].unit_params, ladders[down].unit_params
        pool = min(p_up * ladders[up].size, p_down * ladders[down].size)
        moved = max(abs(rng.normal()) * scale * pool, max(p_up, p_down))
        child = best.astype(np.float64).copy()
        child[up] += max(1, round(moved / p_up))
        child[down] -= max(1, round(moved / p_down))
        out.append(fit_budget(child, ladders, need))
    return out


def search_plan(n: int) -> tuple[int, int, int]:
    """How `n` whole-model sub-models are spent: (antithetic pairs, gradient steps, mutations); the probes'
    own allocation is one more."""
    pairs = max(2, n // 4)
    steps = 3
    return pairs, steps, max(0, n - 2 * pairs - steps)


def top_distinct(rows: list[np.ndarray], utility: np.ndarray, k: int) -> list[int]:
    """Indices of the `k` best rows by utility (finite ones), one per distinct allocation."""
    seen, out = set(), []
    for i in np.argsort(-np.where(np.isfinite(utility), utility, -np.inf), kind="stable"):
        key = tuple(int(x) for x in rows[i])
        if key in seen or not np.isfinite(utility[i]):
            continue
        seen.add(key)
        out.append(int(i))
        if len(out) == k:
            break
    return out
