"""Probe selection: per-unit sensitivities from one-group sub-models, and the KL utility."""

import numpy as np
import pytest
import torch
from helpers import tiny_model

from bonsai.adapters import GroupKey, get_adapter
from bonsai.engine.divergence import teacher_topk, topk_kl
from bonsai.methods.bonsai.evaluate import SubModelEvaluator, prior_pass
from bonsai.methods.bonsai.sampling import probe_masks
from bonsai.methods.bonsai.scoring import probe_unit_costs
from bonsai.methods.bonsai.state import IterationState

pytestmark = pytest.mark.unit


def test_probe_sensitivities_are_the_slopes_of_each_groups_cost_curve():
    keys = [GroupKey(0, "mlp"), GroupKey(1, "mlp")]
    prior = {"0.mlp": np.array([0.2, 0.1, 0.4, 0.3]), "1.mlp": np.array([1.0, 2.0])}
    cands = {"0.mlp": np.arange(4), "1.mlp": np.arange(2)}
    masks = probe_masks([prior["0.mlp"], prior["1.mlp"]], levels=2)  # depths 2,4 in group 0; 1,2 in group 1
    base = 2.0
    loss = np.array([2.1, 2.5, 2.02, 2.06])  # per probe row, in the order of probe_masks
    it = IterationState(0, prior, cands, masks, -loss, np.ones(4, bool), base, np.zeros(6), np.zeros(6))
    err = np.array([1.0, 2.0, 3.0, 4.0, 0.5, 0.5])  # candidate order
    beta, record = probe_unit_costs(it, keys, np.array([0, 4, 6]), err)
    # group 0, prior order 1,0,3,2: units 1,0 cost 0.1 over errors 2+1; units 3,2 a further 0.4 over 4+3
    np.testing.assert_allclose(beta[[1, 0]], 0.1 / 3)
    np.testing.assert_allclose(beta[[3, 2]], 0.4 / 7)
    np.testing.assert_allclose(beta[4], 0.02 / 0.5)  # group 1, prior order 0,1
    np.testing.assert_allclose(beta[5], 0.04 / 0.5)
    assert record == pytest.approx({"0.mlp": 0.5, "1.mlp": 0.06})


def test_a_wider_pool_prices_the_probed_units_as_the_floor_alone_does():
    """The allocation search keeps candidates past the probes' depth: the probed units' costs (and the floor under
    measured gains) are those of a run whose pool is the probed units alone; the rest get the deepest slope."""
    keys = [GroupKey(0, "mlp"), GroupKey(1, "mlp")]
    rng = np.random.default_rng(0)
    prior = {"0.mlp": rng.random(8), "1.mlp": rng.random(6)}
    narrow = {k: np.sort(np.argsort(v)[:4]) for k, v in prior.items()}  # the lowest-prior four: the floor
    wide = {k: np.sort(np.argsort(v)[:c]) for (k, v), c in zip(prior.items(), (7, 5), strict=True)}
    err = {k: rng.random(len(v)) + 0.1 for k, v in prior.items()}  # per unit of the group
    # two depths a group (2 and 4 units); group 1's probes measured gains: its units sit at the floor, which the
    # extrapolated units must not move (the median of the measured costs sets it)
    increase = np.array([0.1, 0.5, -0.01, -0.02])

    def costs(cands, reach):
        pri = [prior[str(k)][cands[str(k)]] for k in keys]
        masks = probe_masks(pri, levels=2, reach=reach)
        it = IterationState(0, prior, cands, masks, -increase, np.ones(4, bool), 0.0, np.zeros(1), np.zeros(1))
        offsets = np.cumsum([0] + [len(cands[str(k)]) for k in keys])
        beta, _ = probe_unit_costs(it, keys, offsets, np.concatenate([err[str(k)][cands[str(k)]] for k in keys]),
                                   base=False)
        return {str(k): dict(zip(cands[str(k)].tolist(), beta[offsets[j]:offsets[j + 1]], strict=True))
                for j, k in enumerate(keys)}

    alone, widened = costs(narrow, None), costs(wide, [4, 4])
    for k in alone:
        for unit, cost in alone[k].items():
            assert widened[k][unit] == pytest.approx(cost, rel=1e-12)
        extra = set(wide[k]) - set(narrow[k])
        order = np.argsort(prior[k][narrow[k]], kind="stable")
        deepest = alone[k][int(narrow[k][order[-1]])]  # the cost of the last unit the deepest probe dropped
        assert all(widened[k][u] == pytest.approx(deepest) for u in extra)


def test_kl_utility_is_zero_for_the_model_itself_and_matches_a_hand_computation():
    model = tiny_model("llama")
    with torch.no_grad():  # sharper next-token distributions: a KL well above float32's rounding (3e-5 -> 2e-3)
        model.lm_head.weight.mul_(8.0)
    adapter = get_adapter(model)
    windows = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    _, _, reference = prior_pass(model, adapter, adapter.groups(), windows, "wanda", 2, reference=True)
    key = GroupKey(1, "mlp")
    full = {k: torch.ones(2, adapter.group_size(k), dtype=torch.uint8) for k in adapter.groups()}
    full[key][1, :40] = 0  # sub-model 1 drops forty channels of layer 1
    evaluator = SubModelEvaluator(model, adapter, adapter.groups(), windows, full, 2, reference=reference)
    utility, _ = evaluator.evaluate([0, 1])
    assert utility[0] == pytest.approx(0.0, abs=1e-6)
    from bonsai.engine.masks import UnitMasks

    with UnitMasks(adapter) as m, torch.no_grad():
        m.set({key: full[key][1]})
        logits = model(windows).logits[:, :-1]
    expect = topk_kl(logits, teacher_topk(model(windows).logits[:, :-1].detach(), 64)).mean()
    assert -utility[1] == pytest.approx(float(expect), rel=1e-4)  # float32 log-softmax differences
    assert utility[1] < 0


def test_emptied_groups_name_the_iteration_and_the_evidence():
    from bonsai.methods.bonsai.report import emptied_groups

    initial = {"0.attention": 2, "0.mlp": 8, "1.attention": 0, "1.mlp": 8}  # layer 1's heads were gone before
    probes = {"0.attention": 0.01, "0.mlp": 0.5, "1.mlp": 0.2}
    history = [
        {"iteration": 1, "attention_units": [1, 0], "mlp_units": [6, 8], "probe_increase": probes},
        {"iteration": 2, "attention_units": [0, 0], "mlp_units": [6, 7], "probe_increase": probes},
        {"iteration": 3, "attention_units": [0, 0], "mlp_units": [6, 0]},  # the paper's selection: no probes
    ]
    out = emptied_groups(history, initial)
    assert out == [
        {"group": "0.attention", "iteration": 2, "units_before": 1, "probe_increase": 0.01,
         "median_probe_increase": 0.2},
        {"group": "1.mlp", "iteration": 3, "units_before": 7},
    ]
