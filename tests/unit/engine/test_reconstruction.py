"""Reconstruction: closed-form refits, sequential statistics, lower calibration loss, emptied layers."""

import copy

import pytest
import torch
from helpers import FAMILIES, tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.engine.reconstruction import REFIT_TOKENS_PER_COLUMN, refit_windows, remove_units, widest_projection
from bonsai.engine.refit import refit_projection
from bonsai.engine.statistics import GramStats
from bonsai.eval.perplexity import window_nll

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


@pytest.mark.parametrize("host_states", [None, "host", "spill"])
@pytest.mark.parametrize("family", ["llama-gqa", "phi"])
def test_statistics_come_from_the_pruned_prefix(family, host_states, monkeypatch):
    """Block-by-block refit == an independent refit that reads each layer's statistics from full-model forwards
    (hooks) of the model whose earlier layers are already pruned and refit (attention before MLP; Phi in parallel).
    `host_states`: the block states kept apart from the model (as on an accelerator with large refit sets, or in a
    temporary file on a CPU)."""
    import bonsai.engine.spill as spill

    if host_states:
        store = torch.device("cpu") if host_states == "host" else spill.SpillStore()
        monkeypatch.setattr(spill, "states_store", lambda model, tokens, copies=2: store)
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


# ---- --refit-target residual -----------------------------------------------------------------------------------

def _target(X, T):
    from bonsai.engine.refit import TargetStats

    return TargetStats(T.T @ X, T.sum(0), float(T.pow(2).sum()))


def test_target_refit_equals_closed_form_least_squares_and_reports_its_errors():
    """With other outputs T to fit, [W'_S, b'] is the least-squares fit of T on [x_S, 1] (damp 0), and the errors
    are ||T - fit||^2 / ||T||^2 with the old weights (dropped) and the new ones (refit)."""
    X, W, b = _problem(7)
    T = X @ torch.randn(12, 5, dtype=X.dtype, generator=torch.Generator().manual_seed(8)) + 0.5
    keep = torch.tensor([0, 1, 4, 5, 8, 10])
    G, s, n = _stats(X)
    fit = refit_projection(W, b, G, s, n, keep, "lstsq", damp=0.0, target=_target(X, T))
    A = torch.cat([X[:, keep], torch.ones(n, 1, dtype=X.dtype)], 1)
    expect = torch.linalg.lstsq(A, T).solution.T
    torch.testing.assert_close(fit.weight, expect[:, :-1], atol=1e-9, rtol=0)
    torch.testing.assert_close(fit.bias, expect[:, -1], atol=1e-9, rtol=0)
    power = T.pow(2).sum()
    refit_err = (T - X[:, keep] @ fit.weight.T - fit.bias).pow(2).sum() / power
    drop_err = (T - X[:, keep] @ W[:, keep].T - b).pow(2).sum() / power
    assert fit.error_refit == pytest.approx(float(refit_err), rel=1e-7)
    assert fit.error_dropped == pytest.approx(float(drop_err), rel=1e-7)
    # without a bias, and damped: ridge towards W_S (augmented least squares)
    damp = 0.05
    lam = damp * G.diagonal().mean()
    fit = refit_projection(W, None, G, s, n, keep, "lstsq", damp=damp, target=_target(X, T))
    A = torch.cat([X[:, keep], lam.sqrt() * torch.eye(len(keep), dtype=X.dtype)])
    expect = torch.linalg.lstsq(A, torch.cat([T, lam.sqrt() * W[:, keep].T])).solution.T
    torch.testing.assert_close(fit.weight, expect, atol=1e-9, rtol=0)


def test_target_refit_of_the_layers_own_outputs_with_every_column_returns_the_weights():
    X, W, b = _problem(9)
    G, s, n = _stats(X)
    fit = refit_projection(W, b, G, s, n, torch.arange(12), "lstsq", damp=0.01, target=_target(X, X @ W.T + b))
    torch.testing.assert_close(fit.weight, W, atol=1e-9, rtol=0)
    torch.testing.assert_close(fit.bias, b, atol=1e-9, rtol=0)
    assert fit.error_refit < 1e-20


def _residual_refit_by_full_forwards(parent, model, plan, windows, damp):
    """An independent residual-target refit: each sub-layer's statistics from full-model forwards (hooks) of the
    untouched parent and of the model whose earlier sub-layers are already pruned and refit."""
    pa, ad = get_adapter(parent), get_adapter(model)
    first = min(k.layer for k in plan)

    def grab(m, adapter, i, kind):
        seen = {}
        block = adapter.layers()[i]
        lin = adapter.output_projection(GroupKey(i, kind))
        att = adapter.output_projection(GroupKey(i, ATTENTION))
        def block_input(mod, args, kw):
            seen["h"] = kw.get("hidden_states", args[0] if args else None)

        hs = [block.register_forward_pre_hook(block_input, with_kwargs=True),
              lin.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0])),
              att.register_forward_hook(lambda mod, args, out: seen.__setitem__("a", out))]
        with torch.no_grad():
            m(windows)
        for h in hs:
            h.remove()
        return {k: v.reshape(-1, v.shape[-1]) for k, v in seen.items()}

    for i in range(first, ad.num_layers):
        scale = ad.residual_scale(i)
        for kind in (ATTENTION, MLP):
            key = GroupKey(i, kind)
            ref, cur = grab(parent, pa, i, kind), grab(model, ad, i, kind)
            ref_lin, lin = pa.output_projection(key), ad.output_projection(key)
            T = torch.nn.functional.linear(ref["x"], ref_lin.weight, ref_lin.bias) + (ref["h"] - cur["h"]) / scale
            if kind == MLP:
                T = T + ref["a"] - cur["a"]
            X = cur["x"]
            cols = torch.arange(X.shape[1])
            if key in plan:
                width = ad.unit_width(key)
                cols = (plan[key][:, None] * width + torch.arange(width)).reshape(-1)
            lam = damp * X.pow(2).sum(0).mean()
            k = len(cols)
            A = X[:, cols]
            if lin.bias is not None:
                A = torch.cat([A, torch.ones(len(X), 1, dtype=X.dtype)], 1)
            ridge = torch.zeros(k, A.shape[1], dtype=X.dtype)
            ridge[:, :k] = lam.sqrt() * torch.eye(k, dtype=X.dtype)
            sol = torch.linalg.lstsq(torch.cat([A, ridge]), torch.cat([T, lam.sqrt() * lin.weight[:, cols].T])).solution.T
            if key in plan:
                ad.slice(key, plan[key])
            with torch.no_grad():
                ad.output_projection(key).weight.copy_(sol[:, :k])
                if lin.bias is not None:
                    ad.output_projection(key).bias.copy_(sol[:, k])


@pytest.mark.parametrize("family", ["llama-gqa", "phi", "gemma3"])
def test_spilled_states_give_the_same_refit_bit_for_bit(family, monkeypatch):
    """Block states kept in temporary files (a CPU run whose refit states pass the budget) give the refit of states
    kept in memory exactly, for both refit targets and the unit errors, and leave no file behind."""
    import os

    import bonsai.engine.spill as spill_module
    from bonsai.engine.compensation import group_statistics

    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(5))
    results = {}
    for spill in (False, True):
        stores: list = []

        def store(model, tokens, copies=2, stores=stores):
            stores.append(spill_module.SpillStore())
            return stores[-1]

        if spill:
            monkeypatch.setattr(spill_module, "states_store", store)
        for target in ("own", "residual"):
            model = tiny_model(family).double()
            adapter = get_adapter(model)
            stats, _ = group_statistics(model, adapter, adapter.groups(), windows, 4)
            plan = {k: torch.arange(0, adapter.group_size(k), 2) for k in adapter.groups()}
            remove_units(model, adapter, plan, windows, "lstsq", damp=0.01, batch_size=4, target=target)
            with torch.no_grad():
                results[spill, target] = (model(windows).logits, {k: v.unit_error for k, v in stats.items()})
        if spill:
            assert stores and all(os.listdir(s.directory) == [] for s in stores)
    for target in ("own", "residual"):
        assert torch.equal(results[True, target][0], results[False, target][0])
        for k, v in results[False, target][1].items():
            assert torch.equal(results[True, target][1][k], v)


@pytest.mark.parametrize("family", ["llama-gqa", "phi", "granite"])
def test_residual_target_equals_an_independent_refit_from_full_forwards(family):
    """--refit-target residual == the same fit computed from full-model forwards of the parent and of the model
    being refit, sub-layer by sub-layer (from the first pruned block on, every group refit; Phi's parallel block;
    Granite's residual multiplier)."""
    model = tiny_model(family).double()
    parent, independent = copy.deepcopy(model), copy.deepcopy(model)
    adapter = get_adapter(model)
    windows = torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(4))
    a1, m1, m2 = GroupKey(1, ATTENTION), GroupKey(1, MLP), GroupKey(2, MLP)
    plan = {a1: torch.arange(1, adapter.group_size(a1)), m1: torch.arange(0, adapter.group_size(m1), 2),
            m2: torch.arange(1, adapter.group_size(m2), 2)}
    report = remove_units(model, adapter, plan, windows, "lstsq", damp=0.01, batch_size=4, target="residual")
    assert set(report.groups) == {str(GroupKey(i, k)) for i in range(1, adapter.num_layers) for k in (ATTENTION, MLP)}
    _residual_refit_by_full_forwards(parent, independent, plan, windows, 0.01)
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, independent(windows).logits, atol=1e-9, rtol=0)
        # layer 0 untouched, and the refit changed the unpruned groups after the first pruned block
        torch.testing.assert_close(adapter.output_projection(GroupKey(0, MLP)).weight,
                                   get_adapter(parent).output_projection(GroupKey(0, MLP)).weight, atol=0, rtol=0)
        assert not torch.allclose(adapter.output_projection(GroupKey(2, ATTENTION)).weight,
                                  get_adapter(parent).output_projection(GroupKey(2, ATTENTION)).weight)


def test_residual_target_lowers_calibration_loss_below_the_own_output_refit(tiny_tokenizer):
    from bonsai.data import calibration_windows
    from bonsai.models.loading import load_model

    windows = calibration_windows(tiny_tokenizer, "kjv", 16, 64, seed=2)
    losses = {}
    for target in ("own", "residual"):
        model = load_model("tiny", dtype="float32", device="cpu")
        adapter = get_adapter(model)
        keep = {k: torch.arange(adapter.group_size(k) // 3, adapter.group_size(k)) for k in adapter.groups()}
        remove_units(model, adapter, keep, windows, "lstsq", batch_size=8, target=target)
        losses[target] = window_nll(model, windows, 8).loss
    assert losses["residual"] < losses["own"]


def test_residual_target_falls_back_to_own_outputs_where_a_norm_follows_the_projection():
    """Gemma-2's norms after attention and MLP make the residual target non-linear in the weights: the refit says
    so and is the own-output refit, bit for bit."""
    results, warnings = [], []
    for target in ("own", "residual"):
        model = tiny_model("gemma2").double()
        adapter = get_adapter(model)
        windows = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(5))
        report = remove_units(model, adapter, _keep_plan(adapter), windows, "lstsq", batch_size=4, target=target)
        warnings.append(report.warnings)
        with torch.no_grad():
            results.append(model(windows).logits)
    assert torch.equal(results[0], results[1])
    assert warnings[0] == [] and len(warnings[1]) == 1 and "--refit-target own" in warnings[1][0]


def test_unknown_refit_target_is_refused():
    from bonsai.errors import BonsaiError

    model = tiny_model("llama")
    with pytest.raises(BonsaiError, match="refit target"):
        remove_units(model, get_adapter(model), {}, None, "lstsq", target="parent")
