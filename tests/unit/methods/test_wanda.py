"""Wanda: scores and masks against hand computations; the block-by-block pass against full-model hooks."""

import pytest
import torch
from helpers import tiny_model

from bonsai.adapters import get_adapter
from bonsai.methods.wanda import parse_sparsity_type, prune_mask, prune_wanda, wanda_scores
from bonsai.engine.blocks import block_linears
from bonsai.engine.statistics import InputNorms
from bonsai.errors import BonsaiError

pytestmark = pytest.mark.unit


def test_scores_equal_hand_computation_on_a_small_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4, bias=False)
    x = torch.randn(3, 5, 6)
    norms = InputNorms({"lin": lin})
    lin(x)
    norms.remove()
    n = norms.norms()["lin"]
    for j in range(6):
        assert abs(n[j].item() - sum(float(x[a, b, j]) ** 2 for a in range(3) for b in range(5)) ** 0.5) < 1e-5
    s = wanda_scores(lin.weight, n)
    for i in range(4):
        for j in range(6):
            assert abs(s[i, j].item() - abs(lin.weight[i, j].item()) * n[j].item()) < 1e-6


def test_masks_by_brute_force():
    torch.manual_seed(1)
    scores = torch.rand(5, 16)
    mask = prune_mask(scores, 0.5, None)
    for i in range(5):
        lowest = sorted(range(16), key=lambda j: scores[i, j].item())[:8]
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(lowest)
    mask = prune_mask(scores, 0.5, parse_sparsity_type("2:4", 0.5))
    for i in range(5):
        for g in range(4):
            block = scores[i, 4 * g:4 * g + 4].tolist()
            lowest = sorted(range(4), key=lambda j: block[j])[:2]
            assert set(torch.nonzero(mask[i, 4 * g:4 * g + 4]).flatten().tolist()) == set(lowest)
    with pytest.raises(BonsaiError, match="means sparsity 0.5"):
        parse_sparsity_type("2:4", 0.6)


def _reference_wanda(model, windows, sparsity, n_m):
    """Independent: for each layer in turn, a full-model forward (earlier layers already pruned) with hooks."""
    adapter = get_adapter(model)
    for block in adapter.layers():
        linears = block_linears(block, adapter.linear_names)
        sums = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}

        def hook(mod, args, n, sums=sums):
            sums[n].add_(args[0].reshape(-1, args[0].shape[-1]).double().pow(2).sum(0))

        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: hook(mod, args, n)) for n, m in linears.items()]
        with torch.no_grad():
            model(windows)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, m in linears.items():
                score = m.weight.abs() * sums[n].sqrt().float()[None]
                m.weight[prune_mask(score, sparsity, n_m)] = 0


@pytest.mark.parametrize("family,kind", [("llama-gqa", "2:4"), ("phi", "unstructured"), ("qwen2", "4:8")])
def test_blockwise_pass_equals_full_model_reference_and_patterns_are_exact(family, kind):
    windows = torch.randint(0, 97, (6, 24), generator=torch.Generator().manual_seed(2))
    model, ref = tiny_model(family, "eager", intermediate_size=64), tiny_model(family, "eager", intermediate_size=64)
    per_layer = prune_wanda(model, get_adapter(model), windows, 0.5, kind, batch_size=4)
    _reference_wanda(ref, windows, 0.5, parse_sparsity_type(kind, 0.5))
    adapter = get_adapter(model)
    for block, ref_block, stats in zip(adapter.layers(), get_adapter(ref).layers(), per_layer, strict=True):
        for name, lin in block_linears(block, adapter.linear_names).items():
            assert torch.equal(lin.weight == 0, block_linears(ref_block, adapter.linear_names)[name].weight == 0)
            zero = lin.weight == 0
            if kind == "unstructured":
                assert (zero.sum(1) == lin.in_features // 2).all()  # exact per row
            else:
                m = int(kind.split(":")[1])
                assert (zero.view(lin.out_features, -1, m).sum(2) == m // 2).all()  # exact N:M in every group
            assert stats[name] == 0.5
