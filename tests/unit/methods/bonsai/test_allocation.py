"""The allocation search's pieces: the budget, antithetic samples, the surrogate's gradient step, mutations."""

import numpy as np
import pytest

from bonsai.engine.selection import select_removals
from bonsai.methods.bonsai.allocation import (
    Ladder,
    fit_budget,
    gradient_steps,
    mutations,
    removed_params,
    sample_allocations,
    search_plan,
    shares,
    top_distinct,
)
from bonsai.methods.bonsai.regression import fit_unit_scores

pytestmark = pytest.mark.unit


def _ladders(rng, sizes=(40, 60, 3, 3), params=(7, 5, 120, 120)) -> list[Ladder]:
    return [Ladder(units=rng.permutation(n), scores=np.sort(rng.random(n)), unit_params=p, reach=n // 2)
            for n, p in zip(sizes, params, strict=True)]


def _on_budget(counts, ladders, need):
    got = removed_params(counts, ladders)
    assert need <= got < need + max(lad.unit_params for lad in ladders), (got, need)
    assert all(0 <= c <= lad.size for c, lad in zip(counts, ladders, strict=True))


def test_fit_budget_from_nothing_is_the_global_greedy_choice():
    rng = np.random.default_rng(0)
    ladders = _ladders(rng, params=(7, 7, 7, 7))  # equal units: the greedy choice has nothing to give back
    need = 400.0
    counts = fit_budget(np.zeros(len(ladders)), ladders, need)
    _on_budget(counts, ladders, need)
    # independently: the global choice by score over every unit, counted per group (scores ascend in each ladder)
    scores = np.concatenate([lad.scores for lad in ladders])
    params = np.concatenate([np.full(lad.size, lad.unit_params) for lad in ladders])
    drop = select_removals(scores, np.zeros(len(scores)), params, need)
    edges = np.cumsum([0] + [lad.size for lad in ladders])
    expect = [int(((drop >= a) & (drop < b)).sum()) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    assert counts.tolist() == expect


def test_fit_budget_with_mixed_units_is_at_least_as_tight_as_the_greedy_choice():
    rng = np.random.default_rng(0)
    ladders = _ladders(rng)
    need = 400.0
    counts = fit_budget(np.zeros(len(ladders)), ladders, need)
    _on_budget(counts, ladders, need)
    scores = np.concatenate([lad.scores for lad in ladders])
    params = np.concatenate([np.full(lad.size, lad.unit_params) for lad in ladders])
    greedy = params[select_removals(scores, np.zeros(len(scores)), params, need)].sum()
    assert removed_params(counts, ladders) <= greedy


def test_fit_budget_gives_back_the_most_expensive_units_first():
    rng = np.random.default_rng(1)
    ladders = _ladders(rng)
    full = np.array([lad.size for lad in ladders])
    need = 300.0
    counts = fit_budget(full, ladders, need)
    _on_budget(counts, ladders, need)
    # every unit still removed scores no higher than the cheapest unit given back of a group of the same unit size
    for g, lad in enumerate(ladders):
        if counts[g] < lad.size and counts[g] > 0:
            given_back = lad.scores[counts[g]]
            same = [h for h, o in enumerate(ladders) if o.unit_params == lad.unit_params]
            for h in same:
                if counts[h]:
                    assert ladders[h].scores[counts[h] - 1] <= given_back + 1e-12


def test_antithetic_samples_sit_on_the_budget_either_side_of_the_base():
    ladders = [Ladder(units=np.arange(1000), scores=np.linspace(0, 1, 1000), unit_params=1, reach=500)
               for _ in range(6)]
    base = np.full(6, 500)
    need = 3000.0
    rows = sample_allocations(base, ladders, pairs=5, scale=0.05, need=need, rng=np.random.default_rng(3))
    assert len(rows) == 10
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        _on_budget(a, ladders, need)
        _on_budget(b, ladders, need)
        assert np.abs(a - base).max() > 10  # a real move (std 50 units)
        assert np.abs(a + b - 2 * base).max() <= 3  # the complement moves the other way (rounding, the budget)


def test_gradient_step_moves_removal_to_where_it_costs_least():
    ladders = [Ladder(units=np.arange(100), scores=np.linspace(0, 1, 100), unit_params=1, reach=50) for _ in range(3)]
    base = np.array([50, 50, 50])
    beta = np.array([1.0, 0.0, -1.0])  # removing more of group 0 raises the utility; of group 2 lowers it
    short, long = gradient_steps(base, beta, ladders, scale=0.1, need=150.0, lengths=(1.0, 2.0))
    for row in (short, long):
        _on_budget(row, ladders, 150.0)
    assert short[0] > 50 > short[2] and short[1] == 50
    assert long[0] - 50 == pytest.approx(2 * (short[0] - 50), abs=1)


def test_the_surrogate_finds_a_better_allocation_than_the_base():
    """Utility additive in the groups' shares with known weights plus noise: the ridge fit on antithetic samples
    (penalty by held-out Kendall tau) points the step the right way."""
    rng = np.random.default_rng(4)
    ladders = [Ladder(units=np.arange(200), scores=np.linspace(0, 1, 200), unit_params=p, reach=100)
               for p in (1, 1, 2, 2, 3, 3)]
    weights = np.array([-1.0, -3.0, -2.0, -0.5, -1.5, -2.5])  # utility lost per share of each pool removed
    base = np.array([100, 100, 100, 100, 100, 100])
    need = removed_params(base, ladders)

    def utility(c):
        return float(weights @ (np.asarray(c) / 200.0))

    rows = [base] + sample_allocations(base, ladders, 8, 0.1, need, rng)
    y = np.array([utility(r) for r in rows]) + rng.normal(0, 1e-3, len(rows))
    fit = fit_unit_scores(np.stack([shares(r, base, ladders) for r in rows]), y, "ridge", folds=4, seed=0)
    assert fit.cv_tau > 0.5
    steps = gradient_steps(base, fit.beta, ladders, 0.1, need)
    assert max(utility(s) for s in steps) > utility(base) + 0.01


def test_mutations_move_budget_between_two_groups():
    rng = np.random.default_rng(5)
    ladders = _ladders(rng)
    need = 400.0
    best = fit_budget(np.zeros(len(ladders)), ladders, need)
    children = mutations(best, ladders, 12, 0.2, need, np.random.default_rng(6))
    assert len(children) == 12
    for c in children:
        _on_budget(c, ladders, need)
    assert all(not np.array_equal(c, best) for c in children)


def test_plan_spends_the_budget_and_top_distinct_skips_repeats():
    for n in (8, 16, 32, 33):
        pairs, steps, mutants = search_plan(n)
        assert 2 * pairs + steps + mutants == n
    rows = [np.array([1, 2]), np.array([1, 2]), np.array([2, 1]), np.array([0, 3])]
    assert top_distinct(rows, np.array([0.5, 0.5, np.nan, 0.1]), 3) == [0, 3]
