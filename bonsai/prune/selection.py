"""Global removal of the lowest-scoring units, counting real parameters (paper Eq. 2)."""

from __future__ import annotations

import numpy as np


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
