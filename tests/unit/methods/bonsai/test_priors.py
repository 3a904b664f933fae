"""Module-level priors (paper Appendix F) against a hand computation from captured activations."""

import pytest
import torch
from helpers import tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.methods.bonsai.evaluate import prior_pass

pytestmark = pytest.mark.unit


def capture_inputs(model, modules, ids):
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args[0].detach()))
             for name, m in modules.items()]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "phi"])
def test_wanda_and_activation_priors_by_hand(family):
    model = tiny_model(family, "sdpa")
    adapter = get_adapter(model)
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(0))
    groups = [GroupKey(1, ATTENTION), GroupKey(1, MLP)]
    wanda, _ = prior_pass(model, adapter, groups, ids, "wanda", batch_size=2)
    act, loss = prior_pass(model, adapter, groups, ids, "activation", batch_size=3)
    outs = {g: adapter.output_projection(g) for g in groups}
    x = capture_inputs(model, outs, ids)
    for g in groups:
        a = x[g].reshape(-1, x[g].shape[-1])  # tokens x columns
        w = outs[g].weight
        width = adapter.unit_width(g)
        per_col = w.abs().mean(0) * a.pow(2).mean(0).sqrt()
        expected = per_col.view(-1, width).mean(1)
        torch.testing.assert_close(torch.from_numpy(wanda[g]).float(), expected, rtol=1e-4, atol=1e-6)
        expected_act = a.abs().mean(0).view(-1, width).mean(1)
        torch.testing.assert_close(torch.from_numpy(act[g]).float(), expected_act, rtol=1e-4, atol=1e-6)
    # the same pass yields the calibration loss
    with torch.no_grad():
        ref = model(ids, labels=ids).loss.item()
    assert loss == pytest.approx(ref, rel=1e-5)


def test_magnitude_prior_by_hand():
    model = tiny_model("llama", "sdpa")
    adapter = get_adapter(model)
    g = GroupKey(0, MLP)
    prior, _ = prior_pass(model, adapter, [g], torch.randint(0, 97, (1, 8)), "magnitude", 1)
    mlp = model.model.layers[0].mlp
    j = 5
    parts = [mlp.gate_proj.weight[j], mlp.up_proj.weight[j], mlp.down_proj.weight[:, j]]
    expected = torch.cat(parts).abs().mean().item()
    assert prior[g][j] == pytest.approx(expected, rel=1e-5)
