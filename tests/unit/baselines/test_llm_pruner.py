"""LLM-Pruner: Taylor importance against autograd by hand; GQA groups stay consistent after slicing."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from bonsai.adapters import GroupKey, get_adapter
from bonsai.baselines.llm_pruner import default_layer_range, group_importance, uniform_removals

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
    from bonsai.masking import UnitMasks

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
