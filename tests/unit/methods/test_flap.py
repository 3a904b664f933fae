"""FLAP: fluctuation scores against a hand computation, the global threshold against the target."""

import numpy as np
import pytest
import torch
from helpers import tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.methods.flap import flap_removals, flap_scores

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("family", ["llama-gqa", "phi"])
def test_scores_equal_a_hand_computation(family):
    model = tiny_model(family).double()
    adapter = get_adapter(model)
    windows = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    keys = adapter.groups()
    inputs = {k: [] for k in keys}
    handles = [adapter.output_projection(k).register_forward_pre_hook(
        lambda m, a, k=k: inputs[k].append(a[0].reshape(-1, a[0].shape[-1]).clone())) for k in keys]
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    scores = flap_scores(model, adapter, keys, windows, batch_size=2)
    for key in keys:
        X = torch.cat(inputs[key])
        W = adapter.output_projection(key).weight.detach()
        variance = X.var(0, unbiased=False)
        per_col = variance * (W ** 2).sum(0)
        if key.kind == ATTENTION:
            per_col = per_col ** 2
        per_col = (per_col - per_col.mean()) / per_col.std()
        expect = per_col.view(-1, adapter.unit_width(key)).mean(1)
        np.testing.assert_allclose(scores[key], expect.numpy(), rtol=1e-6, atol=1e-9)


def test_global_threshold_reaches_the_target_within_one_unit():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    rng = np.random.default_rng(0)
    scores = {k: rng.normal(size=adapter.group_size(k)) for k in adapter.groups()}
    target = 0.3 * adapter.block_parameters()
    drops = flap_removals(scores, adapter, target)
    removed = sum(len(d) * adapter.params_per_unit(k) for k, d in drops.items())
    assert 0 <= removed - target < max(adapter.params_per_unit(k) for k in adapter.groups())
    # the threshold is global: every removed unit scores at most every kept one
    worst_removed = max(scores[k][d].max() for k, d in drops.items() if len(d))
    best_kept = min(np.delete(scores[k], d).min() for k, d in drops.items() if len(d) < len(scores[k]))
    assert worst_removed <= best_kept
    assert GroupKey(0, MLP) in drops
