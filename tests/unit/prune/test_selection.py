import numpy as np
import pytest

from bonsai.prune.selection import select_removals

pytestmark = pytest.mark.unit


def test_removes_lowest_scores_until_budget():
    scores = np.array([0.5, -1.0, 0.2, 0.0, 3.0])
    params = np.array([10, 10, 100, 10, 10])
    drop = select_removals(scores, np.zeros(5), params, 15)
    assert list(drop) == [1, 3]  # -1.0 then 0.0; 20 >= 15
    drop = select_removals(scores, np.zeros(5), params, 25)
    assert list(drop) == [1, 2, 3]  # then 0.2 (a big unit): overshoot < one unit


def test_ties_broken_by_prior():
    drop = select_removals(np.zeros(4), np.array([3.0, 1.0, 2.0, 0.5]), np.ones(4), 2)
    assert list(drop) == [1, 3]


def test_zero_budget_removes_nothing():
    assert len(select_removals(np.ones(3), np.ones(3), np.ones(3), 0)) == 0
