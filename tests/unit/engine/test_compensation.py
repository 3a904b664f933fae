"""Compensated unit errors and compensated sub-models against explicit refits."""

import copy

import pytest
import torch
from helpers import tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.engine import compensation, obs
from bonsai.engine.compensation import CompensatedMasks, group_statistics
from bonsai.engine.obs import damped_inverse, greedy_obs_path, obs_unit_errors, sequential_obs_errors, unit_errors
from bonsai.engine.refit import refit_projection
from bonsai.engine.statistics import GramStats

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("width", [1, 3])
def test_unit_error_is_the_error_left_after_the_optimal_refit(width):
    """e_u = tr(W_u [(H^-1)_uu]^-1 W_u^T) equals (W - W') H (W - W')^T for the refit W' that removes unit u alone
    (zero columns u, the lstsq refit on the others): ||W X - W'_S X_S||^2 + lam ||W'_S - W_S||^2 + lam ||W_u||^2."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    W = torch.randn(4, 12, generator=g, dtype=torch.float64)
    G = X.T @ X
    damp = 0.02
    lam = damp * G.diagonal().mean()
    errors = obs_unit_errors(W, damped_inverse(G, damp), width)
    assert errors.shape == (12 // width,)
    for u in range(12 // width):
        keep = torch.tensor([c for c in range(12) if c // width != u])
        fit = refit_projection(W, None, G, X.sum(0), 300, keep, "lstsq", damp=damp)
        removed = torch.tensor([c for c in range(12) if c // width == u])
        objective = (((X @ W.T - X[:, keep] @ fit.weight.T) ** 2).sum() + lam * ((fit.weight - W[:, keep]) ** 2).sum()
                     + lam * (W[:, removed] ** 2).sum())
        assert float(errors[u]) == pytest.approx(float(objective), rel=1e-8)


@pytest.mark.parametrize("refit", ["none", "bias"])
@pytest.mark.parametrize("width", [1, 3])
def test_unit_error_without_lstsq_is_the_error_that_refit_leaves(refit, width):
    """With no refit (or FLAP's bias refit) to come, a unit's error is what removing it alone leaves, computed
    here by slicing and refitting explicitly: ||W X + b - W'_S X_S - b'||^2 over the tokens."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    X = X + torch.randn(12, generator=g, dtype=torch.float64) * 3  # a mean, so bias and none differ
    W = torch.randn(4, 12, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    G = X.T @ X
    errors = unit_errors(W, G, X.sum(0), 300, width, refit, None)
    assert errors.shape == (12 // width,)
    for u in range(12 // width):
        keep = torch.tensor([c for c in range(12) if c // width != u])
        fit = refit_projection(W, b, G, X.sum(0), 300, keep, refit, damp=0.0)
        left = X @ W.T + b - (X[:, keep] @ fit.weight.T + fit.bias)
        assert float(errors[u]) == pytest.approx(float((left ** 2).sum()), rel=1e-8)
    assert not torch.allclose(unit_errors(W, G, X.sum(0), 300, width, "none", None),
                              unit_errors(W, G, X.sum(0), 300, width, "bias", None))


@pytest.mark.parametrize("cache_bytes", [None, 0])
@pytest.mark.parametrize("family", ["llama-gqa", "phi"])
def test_compensated_sub_model_equals_refit_model(family, cache_bytes, monkeypatch):
    """A sub-model evaluated with compensation gives the logits of the model whose dropped units are removed and
    whose output projections are refit (lstsq, same damping, jointly with the bias where the layer has one: Phi)
    on the same statistics; also when the corrections' cache may hold nothing beyond the last one (each is then
    solved again for the next forward)."""
    if cache_bytes is not None:
        monkeypatch.setattr(compensation, "CORRECTION_CACHE_BYTES", cache_bytes)
    model = tiny_model(family).double()
    adapter = get_adapter(model)
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(1))
    groups = [GroupKey(0, ATTENTION), GroupKey(1, MLP), GroupKey(2, MLP)]
    candidates = {GroupKey(0, ATTENTION): torch.tensor([0, 1]), GroupKey(1, MLP): torch.arange(10),
                  GroupKey(2, MLP): torch.arange(20, 30)}

    def columns(key, errors):
        width = adapter.unit_width(key)
        return (candidates[key][:, None] * width + torch.arange(width)).reshape(-1)

    _, comp = group_statistics(model, adapter, groups, windows, 3, damp=0.01, keep_inverse=True, columns=columns)
    keep_rows = {GroupKey(0, ATTENTION): torch.tensor([[0, 1], [1, 1]]),
                 GroupKey(1, MLP): torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]]),
                 GroupKey(2, MLP): torch.tensor([[1] * 10, [0] * 10])}
    with CompensatedMasks(adapter, comp) as masks, torch.no_grad():
        masks.set(keep_rows)
        both = model(windows[:2]).logits
        if cache_bytes == 0:
            assert len(masks._cache) == 1  # only the correction just computed
            torch.testing.assert_close(model(windows[:2]).logits, both, atol=0, rtol=0)
    with GramStats({k: adapter.output_projection(k) for k in groups}) as stats, torch.no_grad():
        model(windows)
    for row in range(2):
        reference = copy.deepcopy(model)
        ref = get_adapter(reference)
        for key, cand in candidates.items():
            dropped = set(cand[keep_rows[key][row] == 0].tolist())
            kept = torch.tensor([u for u in range(ref.group_size(key)) if u not in dropped])
            width = ref.unit_width(key)
            cols = (kept[:, None] * width + torch.arange(width)).reshape(-1)
            lin = ref.output_projection(key)
            fit = refit_projection(lin.weight, lin.bias, stats.gram[key], stats.sum[key], stats.tokens[key], cols,
                                   "lstsq", 0.01)
            ref.slice(key, kept)
            with torch.no_grad():
                ref.output_projection(key).weight.copy_(fit.weight)
                if fit.bias is not None:
                    ref.output_projection(key).bias.copy_(fit.bias)
        with torch.no_grad():
            torch.testing.assert_close(both[row], reference(windows[row:row + 1]).logits[0], atol=1e-6, rtol=0)


def test_errors_are_relative_to_the_residual_stream():
    model = tiny_model("llama").double()
    adapter = get_adapter(model)
    windows = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    stats, _ = group_statistics(model, adapter, adapter.groups(), windows, 4, damp=0.01)
    assert all(len(stats[k].unit_error) == adapter.group_size(k) for k in adapter.groups())
    with torch.no_grad():  # doubling the output projection quadruples the error; the residual scale is unchanged
        adapter.output_projection(GroupKey(1, MLP)).weight.mul_(2)
    doubled, _ = group_statistics(model, adapter, [GroupKey(1, MLP)], windows, 4, damp=0.01)
    torch.testing.assert_close(doubled[GroupKey(1, MLP)].unit_error, 4 * stats[GroupKey(1, MLP)].unit_error)


@pytest.mark.parametrize("width", [1, 2])
def test_sequential_obs_is_the_greedy_joint_removal(width):
    """Each step removes the unit whose joint removal with the path so far costs least, the marginal errors add
    up to each prefix's joint compensated error tr(W_R [(H^-1)_RR]^-1 W_R^T) (by brute force over subsets), and
    the returned ranking follows the path."""
    g = torch.Generator().manual_seed(4)
    X = torch.randn(200, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    hinv = damped_inverse(X.T @ X, 0.01)
    n = 12 // width

    def joint(units):
        cols = torch.tensor([u * width + j for u in units for j in range(width)])
        W_R = W[:, cols]
        return float((W_R * torch.linalg.solve(hinv[cols][:, cols], W_R.T).T).sum())

    order, marginal, _ = greedy_obs_path(W, hinv, width, 4)
    assert len(order) == 4 and len(set(order)) == 4
    for k in range(1, 5):
        best = min((u for u in range(n) if u not in order[:k - 1]), key=lambda u: joint(order[:k - 1] + [u]))
        assert order[k - 1] == best
        assert float(marginal[:k].sum()) == pytest.approx(joint(order[:k]), rel=1e-8)
    ranking = torch.argsort(sequential_obs_errors(W, hinv, width, 4), stable=True)
    assert ranking[:4].tolist() == order
    assert float(marginal[0]) == pytest.approx(float(obs_unit_errors(W, hinv, width).min()), rel=1e-10)


@pytest.mark.parametrize("block", [7, 64])
def test_deferred_channel_path_equals_the_explicit_updates(block, monkeypatch):
    """MLP channels take the path with deferred block updates; over many blocks it follows the explicit per-step
    updates of W and H^-1: the same order, marginal errors and errors of the units left."""
    import bonsai.engine.obs as compensation

    monkeypatch.setattr(compensation, "OBS_BLOCK", block)
    g = torch.Generator().manual_seed(6)
    X = torch.randn(900, 120, generator=g, dtype=torch.float64) @ torch.randn(120, 120, generator=g, dtype=torch.float64)
    W = torch.randn(30, 120, generator=g, dtype=torch.float64)
    hinv = damped_inverse(X.T @ X, 0.01)
    order, marginal, rest = compensation._greedy_channels(W, hinv, 90)
    order2, marginal2, rest2 = compensation._greedy_units(W, hinv, 1, 90)
    assert order == order2
    torch.testing.assert_close(marginal, marginal2, rtol=1e-8, atol=0)
    torch.testing.assert_close(rest, rest2, rtol=1e-7, atol=1e-12 * float(rest2.max()))


def test_unit_errors_of_a_layer_with_a_bias_are_the_errors_its_refit_leaves():
    """A layer with an output bias (Phi's fc2) is refit jointly with it, so each unit's error is on the covariance:
    up to the group's common residual scale, what an explicit slice-and-refit with the bias leaves."""
    model = tiny_model("phi").double()
    adapter = get_adapter(model)
    key = GroupKey(1, MLP)
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(5))
    damp = 1e-3
    stats, _ = group_statistics(model, adapter, [key], windows, 3, damp=damp)
    lin = adapter.output_projection(key)
    assert lin.bias is not None
    X = []
    handle = lin.register_forward_pre_hook(lambda m, a: X.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(windows)
    handle.remove()
    X = torch.cat(X)
    W, b, n = lin.weight.detach(), lin.bias.detach(), adapter.group_size(key)
    G = X.T @ X
    lam = damp * G.diagonal().mean()
    explicit = []
    for u in range(n):
        keep = torch.tensor([c for c in range(n) if c != u])
        fit = refit_projection(W, b, G, X.sum(0), X.shape[0], keep, "lstsq", damp=damp)
        left = X @ W.T + b - (X[:, keep] @ fit.weight.T + fit.bias)
        explicit.append(float((left ** 2).sum() + lam * ((fit.weight - W[:, keep]) ** 2).sum() + lam * W[:, u].pow(2).sum()))
    ratio = stats[key].unit_error / torch.tensor(explicit, dtype=torch.float64)
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-6, atol=0)


@pytest.mark.parametrize("aside_bytes", [0, 2**40])  # H^-1 set aside in a file / as a copy
def test_sequential_obs_on_h_inverse_itself_keeps_the_original_columns(aside_bytes, monkeypatch):
    """With compensation kept, the MLP's sequential OBS runs on H^-1 itself (one n x n matrix less) and the probes'
    columns come from a copy set aside before: errors and columns equal those computed apart from the Gram matrix
    (a damped inverse that no path has touched)."""
    monkeypatch.setattr(obs, "SET_ASIDE_FILE_BYTES", aside_bytes)
    model = tiny_model("llama").double()
    adapter = get_adapter(model)
    windows = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    groups = [GroupKey(1, ATTENTION), GroupKey(1, MLP)]
    picked = {GroupKey(1, ATTENTION): torch.arange(16, 48), GroupKey(1, MLP): torch.tensor([3, 7, 11, 19, 40, 47])}
    stats, comp = group_statistics(model, adapter, groups, windows, 4, damp=0.01, keep_inverse=True,
                                   sequential=lambda key: 20, columns=lambda key, errors: picked[key])
    with GramStats({k: adapter.output_projection(k) for k in groups}) as grams, torch.no_grad():
        model(windows)
    residual = None
    for key in groups:
        hinv = damped_inverse(grams.gram[key], 0.01)
        kept, cols, _ = comp[key]
        assert torch.equal(cols, picked[key])
        torch.testing.assert_close(kept, hinv[:, picked[key]], rtol=1e-9, atol=1e-12)
        expected = sequential_obs_errors(adapter.output_projection(key).weight, hinv, adapter.unit_width(key), 20)
        ratio = expected / stats[key].unit_error  # the stored errors are divided by the block input's energy
        residual = residual if residual is not None else ratio[0]
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(residual)), rtol=1e-8, atol=0)


def test_a_spilled_matrix_gives_its_columns_a_block_of_rows_at_a_time():
    from bonsai.engine.spill import SpillStore

    m = torch.randn(37, 23, dtype=torch.float64)
    cols = torch.tensor([22, 0, 5, 5, 11])
    spilled = SpillStore().put(m)
    assert torch.equal(spilled.columns(cols, chunk_bytes=3 * 23 * 8), m[:, cols])  # 13 blocks of 3 rows
    assert torch.equal(spilled.columns(cols), m[:, cols])
