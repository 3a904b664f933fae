"""LLM-Pruner: Taylor importance against autograd by hand; GQA groups stay consistent after slicing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from bonsai.adapters import GroupKey, get_adapter
from bonsai.methods.llm_pruner import default_layer_range, group_importance, uniform_removals

pytestmark = pytest.mark.unit


def _loss(model, ids):
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _by_hand(model, windows, importance, aggregation):
    """Explicit loops over units and structures with one autograd call on the whole calibration batch."""
    adapter = get_adapter(model)
    keys = adapter.groups()
    params = {id(u.weight): u.weight for k in keys for u in adapter.unit_weights(k)}
    grads = dict(zip(params, torch.autograd.grad(_loss(model, windows), list(params.values())), strict=True))
    fisher = {i: torch.zeros_like(w) for i, w in params.items()}
    if importance == "element2":
        for j in range(len(windows)):
            gj = torch.autograd.grad(_loss(model, windows[j:j + 1]), list(params.values()))
            for i, g in zip(params, gj, strict=True):
                fisher[i] += g.pow(2) / len(windows)
    out = {}
    for key in keys:
        per_structure = []
        for w, dim, width, start, _ in adapter.unit_weights(key):
            g, f = grads[id(w)], fisher[id(w)]
            scores = []
            for u in range(adapter.group_size(key)):
                sl = slice(start + u * width, start + (u + 1) * width)
                ws, gs, fs = (t[sl] if dim == 0 else t[:, sl] for t in (w.detach(), g, f))
                if importance == "vector":
                    scores.append(abs(float((gs * ws).sum())))
                elif importance == "element1":
                    scores.append(float((gs * ws).abs().sum()))
                else:
                    scores.append(float((gs * ws - 0.5 * fs * ws * ws).abs().sum()))
            per_structure.append(np.array(scores))
        stacked = np.stack(per_structure)
        out[key] = {"sum": stacked.sum(0), "prod": stacked.prod(0), "max": stacked.max(0), "last": stacked[-1]}[aggregation]
    return out


@pytest.mark.parametrize("importance,aggregation,family", [
    ("element1", "sum", "llama-gqa"), ("vector", "max", "llama"), ("element2", "prod", "phi"), ("element1", "last", "qwen2"),
    ("element1", "sum", "phi3"),
])
def test_taylor_importance_equals_autograd_by_hand(importance, aggregation, family):
    model = tiny_model(family, "eager")
    windows = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    adapter = get_adapter(model)
    got = group_importance(model, adapter, adapter.groups(), windows, batch_size=3, importance=importance,
                           aggregation=aggregation)
    ref = _by_hand(model, windows, importance, aggregation)
    for key in adapter.groups():
        np.testing.assert_allclose(got[key], ref[key], rtol=2e-4, atol=1e-12)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_gqa_groups_stay_consistent_and_sliced_equals_masked():
    from bonsai.engine.masks import UnitMasks

    model = tiny_model("llama-gqa", "eager")
    windows = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    adapter = get_adapter(model)
    keys = [k for k in adapter.groups() if 1 <= k.layer < 3]
    imp = group_importance(model, adapter, keys, windows, 4, "element1", "sum")
    target = 0.3 * adapter.block_parameters()
    drops = uniform_removals(imp, adapter, target)
    masks = {k: torch.ones(adapter.group_size(k)) for k in keys}
    for k, d in drops.items():
        masks[k][torch.as_tensor(d, dtype=torch.long)] = 0
    with torch.no_grad(), UnitMasks(adapter, keys) as hooks:
        hooks.set(masks)
        masked = model(windows).logits
    for k in keys:
        adapter.slice(k, torch.nonzero(masks[k]).flatten())
    for i in range(adapter.num_layers):
        att = adapter.attention(i)
        assert att.q.out_features == att.units * att.queries_per_kv * att.head_dim
        assert att.k.out_features == att.v.out_features == att.units * att.head_dim
        assert att.out.in_features == att.q.out_features
    assert sum(adapter.group_size(GroupKey(i, "attention")) for i in (1, 2)) < 4  # KV groups were removed
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, masked, atol=1e-5, rtol=1e-5)


def test_default_layer_range_keeps_first_and_last():
    assert default_layer_range(32) == (4, 30)
    assert default_layer_range(6) == (1, 5)
    assert default_layer_range(2) == (0, 2)


def test_uniform_ratio_reaches_the_target_within_one_unit_with_one_kv_group():
    """With one key/value group per layer a 30% ratio rounds to no attention at all; the MLP of the same layers
    takes up attention's share, and the total lands within one MLP channel of the target."""
    from bonsai.adapters import GroupKey

    model = tiny_model("llama", "eager", num_key_value_heads=1)
    adapter = get_adapter(model)
    rng = np.random.default_rng(0)
    imp = {k: rng.random(adapter.group_size(k)) for k in adapter.groups()}
    target = 0.3 * adapter.block_parameters()
    notes: list[str] = []
    drops = uniform_removals(imp, adapter, target, notes=notes)
    removed = sum(len(d) * adapter.params_per_unit(k) for k, d in drops.items())
    mlp_unit = adapter.params_per_unit(GroupKey(0, "mlp"))
    assert target <= removed < target + mlp_unit
    assert all(len(drops[GroupKey(i, "attention")]) == 0 for i in range(adapter.num_layers))
    mlp_counts = [len(drops[GroupKey(i, "mlp")]) for i in range(adapter.num_layers)]
    assert max(mlp_counts) - min(mlp_counts) <= 1  # still one ratio across the layers
    for k, d in drops.items():  # each group's lowest importance first
        assert set(d.tolist()) == set(np.argsort(imp[k], kind="stable")[:len(d)].tolist())
    assert any(n.startswith("attention: 0.000") for n in notes) and any(n.startswith("mlp:") for n in notes)


def test_uniform_ratio_hands_back_an_overshoot():
    """Three key/value groups: a 30% ratio rounds to one group (33%) per layer; MLP channels are handed back so
    that the total is within one channel of the target instead of 3 points over it."""
    model = tiny_model("llama-gqa", "eager")  # 2 key/value groups per layer: round(0.3 x 2) = 1 (50%)
    adapter = get_adapter(model)
    imp = {k: np.arange(adapter.group_size(k), dtype=float) for k in adapter.groups()}
    target = 0.3 * adapter.block_parameters()
    drops = uniform_removals(imp, adapter, target)
    removed = sum(len(d) * adapter.params_per_unit(k) for k, d in drops.items())
    assert target <= removed < target + max(adapter.params_per_unit(k) for k in adapter.groups())
