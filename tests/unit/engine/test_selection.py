import numpy as np
import pytest

from bonsai.engine.selection import select_removals

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


def _order(n, multiple, allowed, params=10, seed=0):
    from bonsai.engine.selection import GroupOrder

    rng = np.random.default_rng(seed)
    scores = np.sort(rng.random(n))
    return GroupOrder(units=rng.permutation(n), scores=scores, unit_params=params, size=n, multiple=multiple,
                      allowed=allowed)


def test_steps_keep_multiples_and_start_among_candidates():
    g = _order(1409, 128, allowed=300)
    steps = g.steps()
    kept = [g.size - b for _, b in steps]
    assert kept[0] == 1408 and all(k % 128 == 0 for k in kept)
    assert all(a < g.allowed for a, _ in steps) and steps[-1][1] > g.allowed  # rounding may pass the candidates
    assert [b - a for a, b in steps[1:]] == [128] * (len(steps) - 1)


@pytest.mark.parametrize("multiples", [(1, 1), (32, 2), (64, 1)])
def test_select_in_multiples_keeps_multiples_and_the_budget_within_one_step(multiples):
    from bonsai.engine.selection import select_in_multiples

    width, heads = multiples
    groups = [_order(512, width, 200, params=3, seed=i) for i in range(4)] + \
             [_order(8, heads, 3, params=400, seed=10 + i) for i in range(4)]
    budget = 2500.0
    picked = select_in_multiples(groups, budget)
    removed = sum(len(p) * g.unit_params for p, g in zip(picked, groups, strict=True))
    largest_step = max(max((b - a) for a, b in g.steps()) * g.unit_params for g in groups)
    assert budget <= removed < budget + largest_step
    for p, g in zip(picked, groups, strict=True):
        assert (g.size - len(p)) % g.multiple == 0
        assert set(p) == set(g.units[:len(p)])  # a prefix of the removal order


def test_uniform_options_take_the_same_steps_everywhere_at_least_cost_first():
    from bonsai.engine.selection import GroupOrder, uniform_options

    def select_uniform(groups, budget, cost_per_param):
        return uniform_options(groups, budget, cost_per_param)[0][1]

    def group(cost, n, params):
        return GroupOrder(units=np.arange(n), scores=np.full(n, cost), unit_params=params, size=n, multiple=1,
                          allowed=n // 2)

    att = [group(5.0, 4, 100) for _ in range(3)]  # expensive heads
    mlp = [group(0.2, 40, 10) for _ in range(3)]  # cheap channels: 10 of them cost 2, a head 5
    counts = select_uniform({"attention": att, "mlp": mlp}, budget=300, cost_per_param=False)
    assert counts == {"attention": 0, "mlp": 10}  # 3 layers x 10 channels x 10 params
    counts = select_uniform({"attention": att, "mlp": mlp}, budget=900, cost_per_param=False)
    removed = 3 * (counts["attention"] * 100 + counts["mlp"] * 10)
    assert removed >= 900 and counts["attention"] >= 1  # the channels alone (20 allowed) are not enough


def test_uniform_options_never_let_a_coarse_step_overshoot_the_run_target():
    """One key/value group per layer (a head step of 1000 parameters per layer) against channels of 10: early on the
    coarse step is an option (later iterations take its overshoot back), in the last iteration it is not."""
    from bonsai.engine.selection import GroupOrder, uniform_options

    def group(cost, n, params):
        return GroupOrder(units=np.arange(n), scores=np.full(n, cost), unit_params=params, size=n, multiple=1,
                          allowed=n)

    kinds = {"attention": [group(0.0, 2, 1000) for _ in range(3)], "mlp": [group(1.0, 40, 10) for _ in range(3)]}
    early = uniform_options(kinds, budget=600, cost_per_param=False, remaining=3300)
    assert {"attention": 1, "mlp": 0} in [c for _, c in early]  # 3000 of 3300 to go: no overshoot
    last = uniform_options(kinds, budget=60, cost_per_param=False, remaining=60)
    counts = [c for _, c in last]
    assert counts == [{"attention": 0, "mlp": 2}]  # the free-scored head would overshoot the target by 2940
    # without the run's remainder every option that reaches the step is kept, cheapest first
    assert [c for _, c in uniform_options(kinds, budget=60, cost_per_param=False)][0] == {"attention": 1, "mlp": 0}


def test_changed_share_counts_parameters_removed_by_one_decision_only():
    import numpy as np

    from bonsai.engine.selection import changed_share

    params = np.array([10.0, 1.0, 1.0, 5.0])
    assert changed_share(np.array([0, 1]), np.array([0, 1]), params) == 0.0
    assert changed_share(np.array([0, 1]), np.array([1, 3]), params) == (10 + 5) / (10 + 1 + 5)
    assert changed_share(np.array([0]), np.array([2]), params) == 1.0
    assert changed_share(np.array([], dtype=int), np.array([], dtype=int), params) == 0.0
