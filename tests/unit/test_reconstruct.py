"""Reconstruction: closed-form refits, sequential statistics, lower calibration loss, emptied layers."""

import copy

import pytest
import torch
from helpers import FAMILIES, tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.eval.perplexity import window_nll
from bonsai.reconstruct import (
    REFIT_TOKENS_PER_COLUMN,
    GramStats,
    refit_projection,
    refit_windows,
    remove_units,
    widest_projection,
)

pytestmark = pytest.mark.unit


def _problem(seed=0, n=400, d=12, out=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    X += torch.randn(1, d, generator=g, dtype=torch.float64)  # non-zero means, so the bias matters
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64)
    return X, W, b


def _stats(X):
    return X.T @ X, X.sum(0), X.shape[0]


def test_lstsq_equals_closed_form_least_squares():
    X, W, b = _problem()
    keep = torch.tensor([0, 2, 3, 5, 7, 9, 11])
    G, s, n = _stats(X)
    fit = refit_projection(W, None, G, s, n, keep, "lstsq", damp=0.0)
    expect = torch.linalg.lstsq(X[:, keep], X @ W.T).solution.T
    torch.testing.assert_close(fit.weight, expect, atol=1e-10, rtol=0)
    assert fit.bias is None
    # with a bias, [W'_S, b'] is the least-squares fit on [x_S, 1] of W x + b
    fit = refit_projection(W, b, G, s, n, keep, "lstsq", damp=0.0)
    ones = torch.ones(n, 1, dtype=X.dtype)
    expect = torch.linalg.lstsq(torch.cat([X[:, keep], ones], 1), X @ W.T + b).solution.T
    torch.testing.assert_close(fit.weight, expect[:, :-1], atol=1e-10, rtol=0)
    torch.testing.assert_close(fit.bias, expect[:, -1], atol=1e-10, rtol=0)


def test_damping_pulls_towards_the_current_weights():
    """Damped lstsq = ridge towards W_S: min ||W X - W' X_S||^2 + lam ||W' - W_S||^2 (an augmented least squares)."""
    X, W, _ = _problem(1)
    keep = torch.tensor([1, 2, 4, 6, 8])
    G, s, n = _stats(X)
    damp = 0.05
    lam = damp * G.diagonal().mean()
    fit = refit_projection(W, None, G, s, n, keep, "lstsq", damp=damp)
    A = torch.cat([X[:, keep], lam.sqrt() * torch.eye(len(keep), dtype=X.dtype)])
    Y = torch.cat([X @ W.T, lam.sqrt() * W[:, keep].T])
    torch.testing.assert_close(fit.weight, torch.linalg.lstsq(A, Y).solution.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["lstsq", "bias", "none"])
def test_all_columns_kept_returns_the_weights(mode):
    X, W, b = _problem(2)
    G, s, n = _stats(X)
    fit = refit_projection(W, b, G, s, n, torch.arange(W.shape[1]), mode, damp=0.01)
    assert torch.equal(fit.weight, W) and torch.equal(fit.bias, b)


def test_bias_mode_is_flap_compensation():
    X, W, b = _problem(3)
    G, s, n = _stats(X)
    keep = torch.tensor([0, 1, 5, 6])
    removed = torch.tensor([c for c in range(W.shape[1]) if c not in keep.tolist()])
    fit = refit_projection(W, b, G, s, n, keep, "bias")
    torch.testing.assert_close(fit.weight, W[:, keep])
    torch.testing.assert_close(fit.bias, b + W[:, removed] @ X[:, removed].mean(0))
    # without a bias the compensation creates one
    assert refit_projection(W, None, G, s, n, keep, "bias").bias is not None


def test_errors_are_the_output_errors_and_the_refit_lowers_them():
    X, W, b = _problem(4)
    G, s, n = _stats(X)
    keep = torch.tensor([0, 3, 4, 8, 10])
    power = ((X @ W.T + b) ** 2).sum()
    for mode in ("lstsq", "bias", "none"):
        fit = refit_projection(W, b, G, s, n, keep, mode, damp=0.01)
        new_out = X[:, keep] @ fit.weight.T + (fit.bias if fit.bias is not None else 0)
        err = ((X @ W.T + b - new_out) ** 2).sum() / power
        assert fit.error_refit == pytest.approx(float(err), rel=1e-8)
        dropped = ((X @ W.T + b - X[:, keep] @ W[:, keep].T - b) ** 2).sum() / power
        assert fit.error_dropped == pytest.approx(float(dropped), rel=1e-8)
    lstsq = refit_projection(W, b, G, s, n, keep, "lstsq", damp=0.0)
    bias = refit_projection(W, b, G, s, n, keep, "bias")
    assert lstsq.error_refit < bias.error_refit < bias.error_dropped


def _keep_plan(adapter):
    """Units to keep: layer 0 loses an attention unit and half its MLP, layer 1 half its MLP."""
    a0, m0, m1 = GroupKey(0, ATTENTION), GroupKey(0, MLP), GroupKey(1, MLP)
    return {a0: torch.arange(1, adapter.group_size(a0)), m0: torch.arange(0, adapter.group_size(m0), 2),
            m1: torch.arange(1, adapter.group_size(m1), 2)}


@pytest.mark.parametrize("host_states", [False, True])
@pytest.mark.parametrize("family", ["llama-gqa", "phi"])
def test_statistics_come_from_the_pruned_prefix(family, host_states, monkeypatch):
    """Block-by-block refit == an independent refit that reads each layer's statistics from full-model forwards
    (hooks) of the model whose earlier layers are already pruned and refit (attention before MLP; Phi in parallel).
    `host_states`: the block states kept apart from the model (as on an accelerator with large refit sets)."""
    import bonsai.baselines.layerwise as layerwise

    if host_states:
        monkeypatch.setattr(layerwise, "states_store", lambda model, tokens: torch.device("cpu"))
    model = tiny_model(family).double()
    reference = copy.deepcopy(model)
    adapter, ref = get_adapter(model), get_adapter(reference)
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(1))
    plan = _keep_plan(adapter)
    remove_units(model, adapter, plan, windows, "lstsq", damp=0.01, batch_size=4)
    stages = [[GroupKey(0, ATTENTION), GroupKey(0, MLP)], [GroupKey(1, MLP)]] if ref.parallel_block else \
        [[GroupKey(0, ATTENTION)], [GroupKey(0, MLP)], [GroupKey(1, MLP)]]
    for stage in stages:
        with GramStats({k: ref.output_projection(k) for k in stage}) as stats, torch.no_grad():
            reference(windows)
        for key in stage:
            lin = ref.output_projection(key)
            width = ref.unit_width(key)
            cols = (plan[key][:, None] * width + torch.arange(width)).reshape(-1)
            fit = refit_projection(lin.weight, lin.bias, stats.gram[key], stats.sum[key], stats.tokens[key], cols,
                                   "lstsq", 0.01)
            ref.slice(key, plan[key])
            with torch.no_grad():
                ref.output_projection(key).weight.copy_(fit.weight)
                if fit.bias is not None:
                    ref.output_projection(key).bias.copy_(fit.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, reference(windows).logits, atol=1e-10, rtol=0)


def test_reconstruction_lowers_calibration_loss(tiny_tokenizer):
    from bonsai.data import calibration_windows
    from bonsai.models.loading import load_model

    windows = calibration_windows(tiny_tokenizer, "kjv", 16, 64, seed=2)
    losses = {}
    for mode in ("none", "bias", "lstsq"):
        model = load_model("tiny", dtype="float32", device="cpu")
        adapter = get_adapter(model)
        keep = {k: torch.arange(adapter.group_size(k) // 3, adapter.group_size(k)) for k in adapter.groups()}
        remove_units(model, adapter, keep, windows, mode, batch_size=8)
        losses[mode] = window_nll(model, windows, 8).loss
    assert losses["lstsq"] < losses["bias"] < losses["none"]


@pytest.mark.parametrize("family", FAMILIES)
def test_emptied_groups_refit_save_and_reload(family, tmp_path, tiny_tokenizer):
    """A layer losing every attention unit and another every MLP channel: the refit leaves a constant (bias),
    and the checkpoint reloads with bonsai and with stock transformers to the same logits."""
    from transformers import AutoModelForCausalLM

    from bonsai.models.loading import load_model
    from bonsai.models.saving import save_pruned

    model = tiny_model(family, "sdpa", vocab_size=len(tiny_tokenizer))
    adapter = get_adapter(model)
    windows = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3))
    keep = {GroupKey(1, ATTENTION): torch.tensor([], dtype=torch.long), GroupKey(2, MLP): torch.tensor([], dtype=torch.long),
            GroupKey(0, MLP): torch.arange(0, 20)}
    report = remove_units(model, adapter, keep, windows, "lstsq", batch_size=4)
    assert adapter.group_size(GroupKey(1, ATTENTION)) == 0 and adapter.group_size(GroupKey(2, MLP)) == 0
    assert adapter.output_projection(GroupKey(1, ATTENTION)).bias is not None
    if family != "phi":  # phi has output biases already
        assert set(report.added_biases) == {"1.attention", "2.mlp"}
    save_pruned(model, tiny_tokenizer, tmp_path / "m")
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expect = model(ids).logits
        torch.testing.assert_close(load_model(str(tmp_path / "m"), device="cpu", dtype="float32")(ids).logits, expect,
                                   atol=1e-5, rtol=0)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True, dtype=torch.float32)
        torch.testing.assert_close(stock(ids).logits, expect, atol=1e-5, rtol=0)


def test_ill_conditioned_gram_raises_the_damping_and_says_so():
    X, W, _ = _problem(5, n=3)  # 3 tokens, 12 columns: G is singular
    G, s, n = _stats(X)
    warnings = []
    fit = refit_projection(W, None, G, s, n, torch.arange(8), "lstsq", damp=0.0, warn=warnings.append, where="layer 3.mlp")
    assert fit.damp > 0 and torch.isfinite(fit.weight).all()
    assert warnings and "layer 3.mlp" in warnings[0] and "damping raised" in warnings[0]


def test_non_finite_statistics_stop_with_a_clear_error():
    from bonsai.errors import BonsaiError

    X, W, _ = _problem(6)
    G, s, n = _stats(X)
    G[0, 0] = float("inf")
    with pytest.raises(BonsaiError, match="non-finite activation statistics"):
        refit_projection(W, None, G, s, n, torch.arange(6), "lstsq")


@pytest.mark.parametrize("family", ["llama-gqa", "phi"])
def test_default_refit_windows_give_each_column_of_the_widest_projection_its_tokens(family):
    """Without --reconstruct-samples the refit sees REFIT_TOKENS_PER_COLUMN tokens per input column of the widest
    output projection (counted here from the modules themselves), never fewer than the calibration windows; a
    requested count always wins."""
    adapter = get_adapter(tiny_model(family))
    widest = max(max(adapter.output_projection(GroupKey(i, kind)).in_features for kind in (ATTENTION, MLP))
                 for i in range(adapter.num_layers))
    assert widest_projection(adapter, adapter.groups()) == widest
    for seqlen in (16, 64, 1000):
        n = refit_windows(None, 2, widest, seqlen)
        assert n * seqlen >= REFIT_TOKENS_PER_COLUMN * widest > (n - 1) * seqlen or n == 2
    assert refit_windows(None, 10_000, widest, 64) == 10_000
    assert refit_windows(7, 10_000, widest, 64) == 7
    assert refit_windows(None, 32, 11008, 2048) == 86  # LLaMA-2-7B's MLP at the paper's window length
