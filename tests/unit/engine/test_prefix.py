"""Sub-models evaluated from their first changed block equal the same sub-models run through every block."""

import pytest
import torch
from helpers import FAMILIES, MLP_ONLY, tiny_model

from bonsai.adapters import GroupKey, get_adapter
from bonsai.engine.prefix import first_changed_layer
from bonsai.methods.bonsai.evaluate import SubModelEvaluator, prior_pass

pytestmark = pytest.mark.unit


def _probe_masks(adapter, groups):
    """The model itself, then one sub-model per group dropping a third of that group's units."""
    full = {k: torch.ones(len(groups) + 1, adapter.group_size(k), dtype=torch.uint8) for k in groups}
    for row, key in enumerate(groups, start=1):
        n = adapter.group_size(key)
        full[key][row, torch.randperm(n, generator=torch.Generator().manual_seed(row))[: max(1, n // 3)]] = 0
    return full


@pytest.mark.parametrize("family", FAMILIES)
def test_probes_started_at_their_layer_equal_full_forwards(family):
    model = tiny_model(family).double()
    adapter = get_adapter(model)
    groups = adapter.groups(("mlp",) if family in MLP_ONLY else ("attention", "mlp"))
    windows = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(1))
    full = _probe_masks(adapter, groups)
    samples = list(range(len(groups) + 1))[::-1]  # out of layer order: the evaluator sorts, the values stay put
    for reference in (None, prior_pass(model, adapter, groups, windows, "uniform", 2, reference=True)[2]):
        plain = SubModelEvaluator(model, adapter, groups, windows, full, 2, reference=reference, reuse_prefix=False)
        reused = SubModelEvaluator(model, adapter, groups, windows, full, 2, reference=reference)
        want, _ = plain.evaluate(samples)
        got, _ = reused.evaluate(samples[:4])  # two calls sharing one set of kept states (one goes back)
        got2, _ = reused.evaluate(samples[4:])
        # the KL utility is computed in float32 (a small difference of log-probabilities of order 5)
        atol = 1e-12 if reference is None else 1e-7
        torch.testing.assert_close(torch.tensor([*got, *got2]), torch.tensor(want), rtol=1e-10, atol=atol)
        assert reused._prefix is not None and reused._prefix.layer > 0  # the reuse did happen
        assert want[-1] != want[-2]  # the sub-models differ, so equality says something
    # the blocks are all back in place
    assert all(type(b).__name__.endswith("DecoderLayer") for b in adapter.layers())


def test_compensated_probes_started_at_their_layer_equal_full_forwards():
    from bonsai.engine.compensation import group_statistics

    model = tiny_model("llama").double()
    adapter = get_adapter(model)
    groups = adapter.groups()
    windows = torch.randint(0, 97, (6, 12), generator=torch.Generator().manual_seed(2))

    def all_columns(key, errors):
        return torch.arange(adapter.output_projection(key).in_features)

    _, comp = group_statistics(model, adapter, groups, windows, 2, damp=0.01, keep_inverse=True, refit="lstsq",
                               columns=all_columns)
    full = _probe_masks(adapter, groups)
    cands = {k: torch.arange(adapter.group_size(k)) for k in groups}
    kw = dict(compensation=comp, candidates=cands)
    want, _ = SubModelEvaluator(model, adapter, groups, windows, full, 3, reuse_prefix=False, **kw).evaluate(
        list(range(len(groups) + 1)))
    got, _ = SubModelEvaluator(model, adapter, groups, windows, full, 3, **kw).evaluate(list(range(len(groups) + 1)))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-10, atol=1e-12)


def test_first_changed_layer():
    full = {GroupKey(0, "mlp"): torch.tensor([[1, 1], [1, 1], [0, 1]]),
            GroupKey(2, "attention"): torch.tensor([[1, 1], [1, 0], [1, 0]])}
    assert [first_changed_layer(full, s, 4) for s in range(3)] == [3, 2, 0]
