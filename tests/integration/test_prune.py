"""`bonsai prune` end to end on the shipped tiny model and on random LLaMA / Mistral (GQA) / Phi models."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_within_one_unit, crash_resume_and_straight
from safetensors.torch import load_file

from bonsai.adapters import get_adapter
from bonsai.engine.reconstruction import REFIT_TOKENS_PER_COLUMN
from bonsai.eval.runner import run_perplexity
from bonsai.models.loading import load_model
from bonsai.methods.bonsai.settings import PAPER_P_ITER, PROBE_P_ITER, PROBE_P_ITER_UNREFIT
from bonsai.methods.settings import PruneConfig, build_config
from bonsai.methods.bonsai.runner import PruneRun

pytestmark = pytest.mark.integration
# the tests that read the tiny_runs fixture stay on one xdist worker, which builds it once
on_tiny_runs_worker = pytest.mark.xdist_group("tiny_runs")

FAST = dict(calib="kjv", seqlen=64, calib_samples=8, batch_size=16, checkpoint_every=4)


def prune(out, **kw):
    settings = dict(FAST)
    settings.update(kw)
    cfg = PruneConfig(**settings).validate()
    run = PruneRun(cfg, out)
    report = run.run()
    return run, report


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    runs = {}
    for method in ("bonsai", "random"):
        runs[method] = prune(root / method, model="tiny", sparsity=0.3, method=method, p_iter=0.1, samples=32,
                             seqlen=128, calib_samples=16)
    runs["paper"] = prune(root / "paper", model="tiny", sparsity=0.3, p_iter=0.1, samples=32,  # 64-token windows
                          selection="paper", prior="wanda", compensate=False, utility="loss", reconstruct="none",
                          adaptive=False)
    return root, runs


@on_tiny_runs_worker
def test_tiny_sparsity_reached_within_one_unit(tiny_runs):
    root, runs = tiny_runs
    report = json.loads((root / "bonsai" / "report.json").read_text())
    t = report["totals"]
    removed = t["block_params_before"] - t["block_params_after"]
    target = 0.3 * t["block_params_before"]
    assert 0 <= removed - target < t["max_unit_params"]
    assert len(report["iterations"]) >= 3
    for h in report["iterations"]:  # probe: one sub-model per layer group
        assert h["sub_models"] == 12 and len(h["probe_increase"]) == 12
        assert all(v > 0 for v in h["probe_increase"].values())  # KL from the current model
        assert h["reconstruction"]["mean_error_refit"] < h["reconstruction"]["mean_error_dropped"]
        phases = h["phase_seconds"]  # where the iteration's time went: parts of its wall time
        assert set(phases) == {"statistics", "sub_models", "selection", "reconstruction"}
        assert min(phases.values()) >= 0 and sum(phases.values()) <= h["seconds"]
    assert (root / "bonsai" / "report.png").stat().st_size > 0
    # no --reconstruct-samples: the refit's windows give the parent's widest projection its tokens per column
    parent = get_adapter(load_model("tiny", device="cpu"))
    widest = max(parent.output_projection(k).in_features for k in parent.groups())
    assert report["refit_windows"] == max(16, math.ceil(REFIT_TOKENS_PER_COLUMN * widest / 128)) > 16
    paper = json.loads((root / "paper" / "report.json").read_text())
    for h in paper["iterations"]:
        assert h["sub_models"] == 32 and h["cv_tau"] is not None and h["penalty"] > 0


@on_tiny_runs_worker
def test_tiny_output_reloads_with_stock_transformers(tiny_runs):
    from transformers import AutoModelForCausalLM

    root, runs = tiny_runs
    run, _ = runs["bonsai"]
    ids = torch.randint(0, 4000, (2, 32))
    stock = AutoModelForCausalLM.from_pretrained(root / "bonsai", trust_remote_code=True, dtype=torch.float32)
    mine = load_model(str(root / "bonsai"), device="cpu")
    with torch.no_grad():
        ref = run.model(ids).logits
        torch.testing.assert_close(stock(ids).logits, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine(ids).logits, ref, atol=1e-5, rtol=0)


@on_tiny_runs_worker
def test_bonsai_beats_random(tiny_runs):
    root, _ = tiny_runs
    ppl = {m: run_perplexity("kjv", str(root / m), seqlen=128, batch_size=16, device="cpu")["ppl"]
           for m in ("bonsai", "random")}
    assert ppl["bonsai"] < ppl["random"]


@pytest.mark.parametrize("selection,abort", [("probe", "18"), ("paper", "12")])
@pytest.mark.heavy
def test_resume_equals_uninterrupted(tmp_path, selection, abort):
    """Killed in the second iteration's sub-models (probe: 12 per iteration, recomputing the compensation on
    resume; paper: 8 per iteration), the rerun finishes with the uninterrupted run's bytes."""
    args = [sys.executable, "-m", "bonsai", "prune", "--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.1",
            "--samples", "8", "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "8",
            "--checkpoint-every", "2", "--selection", selection]
    if selection == "paper":
        args += ["--prior", "wanda", "--no-compensate", "--utility", "loss", "--no-adaptive"]
    env = dict(os.environ, BONSAI_ABORT_AFTER_EVALS=abort)  # dies in the second iteration, mid-way
    crashed = subprocess.run(args + ["--out", str(tmp_path / "resumed")], env=env, capture_output=True, text=True,
                             timeout=600)
    assert crashed.returncode == 75, crashed.stderr
    state = json.loads((tmp_path / "resumed" / ".bonsai" / "state.json").read_text())
    assert state["completed_iterations"] == 1 and not state["finished"]
    resumed = subprocess.run(args + ["--out", str(tmp_path / "resumed")], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    straight = subprocess.run(args + ["--out", str(tmp_path / "straight")], capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    a = load_file(tmp_path / "resumed" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", ["llama", "mistral", "phi"])
def test_families_prune_and_reload(family, random_checkpoints, tmp_path):
    run, report = prune(tmp_path / family, model=str(random_checkpoints[family]), sparsity=0.25, p_iter=0.1,
                        samples=8, seqlen=32, calib_samples=4)
    assert_within_one_unit(report, 0.25, report["totals"]["max_unit_params"])
    reloaded = load_model(str(tmp_path / family), device="cpu")
    ids = torch.randint(0, 4000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, run.model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prior-only", "no-regression"])
def test_ablations_run(method, tmp_path):
    paper = dict(selection="paper", prior="wanda") if method == "no-regression" else {}
    run, report = prune(tmp_path / method, model="tiny", sparsity=0.1, p_iter=0.1, samples=8, method=method, **paper)
    assert_within_one_unit(report, 0.1, report["totals"]["max_unit_params"])
    assert math.isfinite(report["iterations"][0]["calib_ppl"])


@pytest.mark.heavy
def test_other_settings_refused_then_forced(tmp_path):
    from bonsai.errors import BonsaiError

    prune(tmp_path / "o", model="tiny", sparsity=0.1, p_iter=0.1, samples=4, seqlen=32, calib_samples=2)
    with pytest.raises(BonsaiError, match="other settings"):
        prune(tmp_path / "o", model="tiny", sparsity=0.1, p_iter=0.1, samples=4, seqlen=32, calib_samples=2, seed=1)
    cfg = PruneConfig(**dict(FAST, model="tiny", sparsity=0.1, p_iter=0.1, samples=4, seqlen=32, calib_samples=2,
                             seed=1)).validate()
    PruneRun(cfg, tmp_path / "o", force=True).run()
    assert json.loads((tmp_path / "o" / "report.json").read_text())["settings"]["seed"] == 1


@pytest.mark.heavy
def test_two_processes_equal_one(tmp_path):
    """Sub-model evaluations spread over 2 CPU processes (gloo) give the single-process model exactly."""
    args = [sys.executable, "-m", "bonsai", "prune", "--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.1",
            "--samples", "8", "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "8",
            "--checkpoint-every", "2"]
    # torch.distributed.run gives each process one thread; the reference runs with one too, so that the
    # reconstruction's float reductions (done once, on the main process) round the same way
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(args + ["--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600, env=env)
    two = subprocess.run(args + ["--out", str(tmp_path / "two"), "--processes", "2"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "one" / "report.json").read_text())["iterations"]
    rb = json.loads((tmp_path / "two" / "report.json").read_text())["iterations"]
    # the probe selection's measurements (cv_tau is the paper selection's, None here): each process's share equal
    assert all(h["probe_increase"] for h in ra)
    assert [h["probe_increase"] for h in ra] == [h["probe_increase"] for h in rb]


@pytest.mark.heavy
def test_non_finite_utilities_are_left_out(tmp_path, monkeypatch):
    """An fp16 overflow in some sub-models is logged and kept out of the fit, never a crash."""
    import numpy as np

    from bonsai.methods.bonsai import evaluate

    original = evaluate.SubModelEvaluator.evaluate

    def overflowing(self, samples, on_row=None):
        utility, prior = original(self, samples, on_row)
        utility = np.where(np.array(samples) % 3 == 0, -np.inf, utility)
        return utility, prior

    monkeypatch.setattr(evaluate.SubModelEvaluator, "evaluate", overflowing)
    _, report = prune(tmp_path / "o", model="tiny", sparsity=0.1, p_iter=0.1, samples=12, selection="paper",
                      prior="wanda", utility="loss", adaptive=False)
    it = report["iterations"][0]
    assert it["non_finite"] == 4 and it["cv_tau"] is not None
    # probe: a group whose probe overflowed is treated as infinitely costly, so it keeps its units
    _, report = prune(tmp_path / "p", model="tiny", sparsity=0.1, p_iter=0.1, samples=12)
    it = report["iterations"][0]
    assert it["non_finite"] == 4
    overflowed = [k for j, k in enumerate(it["probe_increase"]) if j % 3 == 0]
    first = report["kept_units"]
    assert all(len(first[k]) == len(set(first[k])) and len(first[k]) == _units(k) for k in overflowed)


def _units(key: str) -> int:
    return {"attention": 6, "mlp": 512}[key.split(".")[1]]


def test_prune_with_accelerate_placement(tmp_path):
    """--device-map hands placement to accelerate (the path for models larger than one device)."""
    run, report = prune(tmp_path / "o", model="tiny", sparsity=0.1, p_iter=0.1, samples=4, device_map="cpu")
    assert_within_one_unit(report, 0.1, report["totals"]["max_unit_params"])
    reloaded = load_model(str(tmp_path / "o"), device="cpu")
    ids = torch.randint(0, 4000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, run.model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.heavy
def test_resume_after_crash_mid_reconstruction_is_bit_identical(tmp_path):
    args = [sys.executable, "-m", "bonsai", "prune", "--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.1",
            "--samples", "6", "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "8",
            "--reconstruct", "lstsq", "--reconstruct-samples", "6"]
    env = dict(os.environ, BONSAI_ABORT_IN_RECONSTRUCTION="2:2")  # iteration 2, after refitting blocks 0-2
    crashed = subprocess.run(args + ["--out", str(tmp_path / "resumed")], env=env, capture_output=True, text=True,
                             timeout=600)
    assert crashed.returncode == 75, crashed.stderr
    state = json.loads((tmp_path / "resumed" / ".bonsai" / "state.json").read_text())
    assert state["completed_iterations"] == 1 and state["refit"] == "weights-1.safetensors"
    resumed = subprocess.run(args + ["--out", str(tmp_path / "resumed")], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(args + ["--out", str(tmp_path / "straight")], capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    a = load_file(tmp_path / "resumed" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "resumed" / ".bonsai").glob("weights-*"))  # the finished model holds them


def test_reconstruct_none_leaves_the_kept_weights_untouched(tmp_path):
    """--reconstruct none is the paper's algorithm: the output is an exact slice of the parent."""
    from bonsai.adapters import GroupKey, get_adapter

    run, report = prune(tmp_path / "o", model="tiny", sparsity=0.2, p_iter=0.1, samples=8, reconstruct="none")
    parent = load_model("tiny", device="cpu")
    adapter = get_adapter(parent)
    for key, kept in report["kept_units"].items():
        adapter.slice(GroupKey.parse(key), torch.tensor(kept, dtype=torch.long))
    saved = load_model(str(tmp_path / "o"), device="cpu")
    for (name, a), (_, b) in zip(parent.state_dict().items(), saved.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert all(h["reconstruction"] is None or h["reconstruction"]["layers"] == 0 for h in report["iterations"])


def test_reconstruction_lowers_the_pruned_models_loss(tmp_path):
    """The refit run's output against the same units sliced out of the parent without any refit. (Each mode's
    own run is not the comparison: with --reconstruct none the scores follow no refit, and on this tiny
    budget, 512 refit tokens for a 512-wide MLP, that selection can win.)"""
    from bonsai.adapters import GroupKey, get_adapter
    from bonsai.models.saving import save_pruned

    base = dict(model="tiny", sparsity=0.3, p_iter=0.1, samples=8, method="prior-only", seqlen=64, calib_samples=8,
                reconstruct_samples=32)
    run, report = prune(tmp_path / "lstsq", reconstruct="lstsq", **base)
    parent = load_model("tiny", device="cpu")
    adapter = get_adapter(parent)
    for key, kept in report["kept_units"].items():
        adapter.slice(GroupKey.parse(key), torch.tensor(kept, dtype=torch.long))
    save_pruned(parent, run.tokenizer, tmp_path / "sliced")
    ppl = {name: run_perplexity("kjv", str(tmp_path / name), seqlen=128, max_windows=16, device="cpu")["ppl"]
           for name in ("lstsq", "sliced")}
    assert ppl["lstsq"] < ppl["sliced"]


@pytest.mark.heavy
@pytest.mark.parametrize("selection", ["paper", "probe"])
def test_layers_emptied_and_pruned_further(tmp_path, random_checkpoints, selection):
    """A layer whose attention (and another whose MLP) is emptied goes on through priors, sampling, compensated
    evaluation, reconstruction and further iterations, then saves and reloads."""
    from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
    from bonsai.models.saving import save_pruned

    model = load_model(str(random_checkpoints["llama"]), device="cpu")
    adapter = get_adapter(model)
    adapter.slice(GroupKey(1, ATTENTION), torch.tensor([], dtype=torch.long))
    adapter.slice(GroupKey(2, MLP), torch.tensor([], dtype=torch.long))
    save_pruned(model, None, tmp_path / "parent")
    from bonsai.models.loading import load_tokenizer

    tok = load_tokenizer(str(random_checkpoints["llama"]))
    for prior in ("wanda", "obs"):
        cfg = PruneConfig(**dict(FAST, model=str(tmp_path / "parent"), sparsity=0.4, p_iter=0.1, samples=8,
                                 selection=selection, prior=prior, compensate=True)).validate()
        run = PruneRun(cfg, tmp_path / f"{selection}-{prior}", tokenizer=tok)
        report = run.run()
        assert len(report["iterations"]) >= 3 and report["totals"]["sparsity"] > 0.3
        # groups this run emptied are reported with their evidence; the parent's empty ones are not
        emptied = {e["group"] for e in report["emptied_groups"]}
        last = report["iterations"][-1]
        zero = {f"{i}.attention" for i, n in enumerate(last["attention_units"]) if n == 0}
        zero |= {f"{i}.mlp" for i, n in enumerate(last["mlp_units"]) if n == 0}
        assert emptied == zero - {"1.attention", "2.mlp"}
        if selection == "probe":
            assert all("probe_increase" in e for e in report["emptied_groups"])
        reloaded = load_model(str(tmp_path / f"{selection}-{prior}"), device="cpu")
        ids = torch.randint(0, 4000, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, run.model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.heavy
@pytest.mark.parametrize("selection", ["probe", "paper"])
def test_width_multiples_hold_in_every_layer(tmp_path, selection):
    paper = dict(prior="wanda", compensate=False, utility="loss") if selection == "paper" else {}
    run, report = prune(tmp_path / "o", model="tiny", sparsity=0.3, p_iter=0.1, samples=8, selection=selection,
                        width_multiple=32, head_multiple=2, **paper)
    last = report["iterations"][-1]
    assert all(w % 32 == 0 for w in last["mlp_units"]) and all(h % 2 == 0 for h in last["attention_units"])
    assert len(set(last["mlp_units"])) > 1  # still a per-layer allocation
    t = report["totals"]
    step = 32 * 3 * 192 + 2 * 4 * 192 * 32  # one MLP step plus one attention step
    assert 0 <= t["block_params_before"] - t["block_params_after"] - 0.3 * t["block_params_before"] < step


def test_width_multiple_one_is_the_plain_selection(tmp_path):
    _, a = prune(tmp_path / "a", model="tiny", sparsity=0.1, p_iter=0.1, samples=8)
    _, b = prune(tmp_path / "b", model="tiny", sparsity=0.1, p_iter=0.1, samples=8, width_multiple=1, head_multiple=1)
    assert a["kept_units"] == b["kept_units"]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_uniform_split_is_measured_and_the_best_measured_is_kept(tmp_path):
    """--allocation uniform: the least-cost attention/MLP splits are evaluated as whole sub-models; the kept one
    has the best utility among them, that utility is the LM loss of the parent with those units masked (a hand
    loop), and --split-probes 1 keeps the scores' own first choice."""
    import torch.nn.functional as F

    from bonsai.adapters import GroupKey
    from bonsai.data import calibration_windows
    from bonsai.engine.masks import UnitMasks

    kw = dict(model="tiny", sparsity=0.3, p_iter=0.3, allocation="uniform", reconstruct="none", utility="loss")
    run, report = prune(tmp_path / "u", **kw)
    (it,) = report["iterations"]
    splits = it["uniform_splits"]
    assert len(splits) == 3 and sum(s["chosen"] for s in splits) == 1
    chosen = next(s for s in splits if s["chosen"])
    assert chosen["utility"] == max(s["utility"] for s in splits)
    assert [s["score_cost"] for s in splits] == sorted(s["score_cost"] for s in splits)
    removed = {"attention": 6 - it["attention_units"][0], "mlp": 512 - it["mlp_units"][0]}
    assert chosen["removed_per_layer"] == removed

    parent = load_model("tiny", device="cpu", dtype="float32")
    adapter = get_adapter(parent)
    windows = calibration_windows(run.tokenizer, "kjv", 8, 64, seed=0)
    masks = {}
    for key, kept in report["kept_units"].items():
        m = torch.zeros(adapter.group_size(GroupKey.parse(key)))
        m[kept] = 1
        masks[GroupKey.parse(key)] = m
    with UnitMasks(adapter) as um, torch.no_grad():
        um.set(masks)
        logits = parent(windows).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()
    assert chosen["utility"] == pytest.approx(-loss, abs=1e-5)

    _, by_scores = prune(tmp_path / "s", split_probes=1, **kw)
    (only,) = by_scores["iterations"]
    assert only["uniform_splits"] is None
    assert {"attention": 6 - only["attention_units"][0], "mlp": 512 - only["mlp_units"][0]} == \
        splits[0]["removed_per_layer"]


def test_uniform_allocation_saves_a_stock_config(tmp_path):
    """Every layer the same sizes: a plain LLaMA config, loaded by stock transformers without remote code, with
    the logits of the parent whose removed units are masked and whose output projections carry the refit."""
    from transformers import AutoModelForCausalLM

    from bonsai.adapters import GroupKey, get_adapter
    from bonsai.engine.masks import UnitMasks

    run, report = prune(tmp_path / "u", model="tiny", sparsity=0.3, p_iter=0.1, samples=8, allocation="uniform",
                        head_multiple=2, reconstruct="none")
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert "bonsai_plan" not in config and "auto_map" not in config and not (tmp_path / "u" / "modeling_bonsai.py").exists()
    last = report["iterations"][-1]
    assert len(set(last["attention_units"])) == 1 and len(set(last["mlp_units"])) == 1
    assert config["intermediate_size"] == last["mlp_units"][0] and config["num_key_value_heads"] == last["attention_units"][0]
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "u", dtype=torch.float32)
    parent = load_model("tiny", device="cpu", dtype="float32")
    adapter = get_adapter(parent)
    masks = {}
    for key, kept in report["kept_units"].items():
        m = torch.zeros(adapter.group_size(GroupKey.parse(key)))
        m[kept] = 1
        masks[GroupKey.parse(key)] = m
    ids = torch.randint(0, 4000, (2, 24))
    with UnitMasks(adapter) as um, torch.no_grad():
        um.set(masks)
        torch.testing.assert_close(stock(ids).logits, parent(ids).logits, atol=1e-5, rtol=0)


def test_dry_run_prints_the_cost_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from bonsai.cli import main

    out = tmp_path / "o"
    monkeypatch.setattr(sys, "argv", ["bonsai", "prune", "--model", "tiny", "--sparsity", "0.3", "--p-iter", "0.1",
                                      "--calib", "kjv", "--seqlen", "64", "--calib-samples", "8",
                                      "--reconstruct-samples", "16", "--out", str(out), "--dry-run"])
    main()
    printed = capsys.readouterr().out
    assert "cost of pruning tiny" in printed and not out.exists()


@pytest.mark.parametrize("target,refit_passes", [("own", 3), ("residual", 4)])
def test_cost_model_counts_the_forward_tokens(target, refit_passes):
    """Tokens through the blocks and through the head, apart: the refit runs each block to its two output
    projections and whole (3 x R); the residual target adds one pass over the reference stream (4 x R); a probe of
    layer i runs blocks i.. and the head, the refit and the unit errors the blocks alone."""
    from bonsai.adapters import get_adapter
    from bonsai.methods.bonsai.cost import estimate

    cfg = PruneConfig(model="tiny", sparsity=0.3, p_iter=0.1, calib_samples=8, reconstruct_samples=16, seqlen=64,
                      batch_size=4, refit_target=target).validate()
    model = load_model("tiny", device="cpu", dtype="float32")
    adapter = get_adapter(model)
    cost = estimate(cfg, model, adapter, adapter.groups(), 64, 3, False)
    C, R, n, L = 8 * 64, 16 * 64, 12, 6  # probe: one sub-model per group
    share = sum((L - i) / L for i in range(L)) / L  # blocks i.. of L, on average; one more pass advances the states
    expect = sum((1 - 0.3 * t / 3) * (C + R + n * C * share + C + refit_passes * R) for t in range(3))
    assert cost.sub_models_per_iteration == 12 and cost.block_tokens == pytest.approx(expect)
    assert cost.head_tokens == pytest.approx(3 * (C + n * C))
    assert cost.seconds == pytest.approx(cost.block_tokens * cost.seconds_per_block_token
                                         + cost.head_tokens * cost.seconds_per_head_token + cost.obs_seconds)
    assert cost.obs_seconds > 0 and set(cost.phase_bytes) == {"prior_pass", "unit_errors", "sub_models", "reconstruction"}
    searched = PruneConfig(model="tiny", sparsity=0.3, p_iter=0.1, calib_samples=8, reconstruct_samples=16, seqlen=64,
                           batch_size=4, refit_target=target, search=16).validate()
    cost = estimate(searched, model, adapter, adapter.groups(), 64, 3, False)
    V = 4 * 8 * 64  # the verification windows: four times the calibration's; up to four allocations and a reference
    search = 17 * C + 5 * V
    assert cost.sub_models_per_iteration == 12 + 17
    assert cost.block_tokens == pytest.approx(expect + sum((1 - 0.3 * t / 3) * search for t in range(3)))
    assert cost.head_tokens == pytest.approx(3 * (C + n * C + search))
    own = PruneConfig(**{**searched.to_dict(), "search_samples": 12}).validate()  # its own windows and reference
    cost = estimate(own, model, adapter, adapter.groups(), 64, 3, False)
    assert cost.head_tokens == pytest.approx(3 * (C + n * C + 18 * 12 * 64 + 5 * V))
    paper = PruneConfig(model="tiny", sparsity=0.3, p_iter=0.1, calib_samples=8, seqlen=64, samples=20, selection="paper",
                        prior="wanda", compensate=False, reconstruct="none", adaptive=False).validate()
    cost = estimate(paper, model, adapter, adapter.groups(), 64, 3, False)
    assert cost.block_tokens == pytest.approx(sum((1 - 0.3 * t / 3) * (C + 20 * C) for t in range(3)))
    assert cost.head_tokens == pytest.approx(3 * 21 * C) and cost.obs_seconds == 0


ADAPTIVE = ["--selection", "paper", "--prior", "wanda", "--no-compensate", "--utility", "loss", "--adaptive",
            "--samples", "24", "--adaptive-round", "4", "--adaptive-tol", "0.4"]


@pytest.mark.heavy
def test_adaptive_resume_takes_the_same_path(tmp_path):
    """--adaptive killed mid-way (rounds and their decisions are checkpointed) finishes with the bytes and the
    convergence record of an uninterrupted run."""
    args = [sys.executable, "-m", "bonsai", "prune", "--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.1",
            "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "8", "--checkpoint-every", "2",
            *ADAPTIVE]
    ra, rb = crash_resume_and_straight(args, tmp_path, "14")
    assert [h["adaptive"] for h in ra] == [h["adaptive"] for h in rb]
    for h in rb:  # the record: rounds of 4 up to where it stopped, and the sub-models it used
        curve = h["adaptive"]["curve"]
        assert [c["sub_models"] for c in curve] == list(range(4, 4 * len(curve) + 1, 4))
        assert h["sub_models"] == h["adaptive"]["sub_models"] == curve[-1]["sub_models"]
        assert h["adaptive"]["stop"] == "converged" or h["sub_models"] == 24


def test_adaptive_stop_equals_a_fixed_run_of_that_many_sub_models(tmp_path):
    """Stopping after k sub-models decides exactly as `--samples k` would (the same masks, the same fit)."""
    common = dict(model="tiny", sparsity=0.1, p_iter=0.1, seqlen=32, calib_samples=4, selection="paper",
                  prior="wanda", compensate=False, utility="loss")
    _, adaptive = prune(tmp_path / "a", samples=40, adaptive=True, adaptive_round=4, adaptive_tol=0.5, **common)
    used = adaptive["iterations"][0]["sub_models"]
    assert used < 40  # it did stop early (a loose tolerance on a tiny model)
    assert used == adaptive["iterations"][0]["adaptive"]["curve"][-1]["sub_models"]
    _, fixed = prune(tmp_path / "f", samples=used, adaptive=False, **common)
    assert fixed["iterations"][0]["cv_tau"] == adaptive["iterations"][0]["cv_tau"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "f" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adaptive_is_the_paper_selections_default_but_not_the_papers_presets():
    assert PruneConfig(model="tiny", selection="paper").validate().adaptive
    assert not PruneConfig(model="tiny").validate().adaptive  # probe selection: nothing to stop early
    assert not PruneConfig(model="tiny", selection="paper", method="no-regression").validate().adaptive
    for preset in ("paper-llama-2-7b", "paper-llama-7b", "paper-mistral-7b", "paper-phi-2"):
        assert not build_config(preset, {}).adaptive, preset  # the paper's algorithm as published
    assert build_config("paper-llama-2-7b", {"adaptive": True}).adaptive  # a flag still wins


def test_probe_selection_takes_few_large_steps_and_the_papers_settings_keep_its_own(tmp_path):
    """bonsai's probe selection defaults to steps of at most 0.3 (one iteration to 30%, two of 0.25 to 50%);
    the paper's selection and the ablations keep Table 9's 0.05, presets and flags still win."""
    assert PruneConfig(model="tiny", sparsity=0.3).validate().p_iter == PROBE_P_ITER == 0.3
    # without a refit the probes are uncompensated: smaller steps
    assert PruneConfig(model="tiny", sparsity=0.3, reconstruct="none").validate().p_iter == PROBE_P_ITER_UNREFIT == 0.1
    assert PruneConfig(model="tiny", sparsity=0.3, reconstruct="bias").validate().p_iter == PROBE_P_ITER
    assert PruneConfig(model="tiny", sparsity=0.2).validate().p_iter == 0.2  # never beyond the target
    assert PruneConfig(model="tiny", sparsity=0.5, selection="paper").validate().p_iter == PAPER_P_ITER == 0.05
    assert PruneConfig(model="tiny", sparsity=0.5, method="prior-only").validate().p_iter == PAPER_P_ITER
    assert PruneConfig(model="tiny", sparsity=0.5, p_iter=0.1).validate().p_iter == 0.1
    assert build_config("paper-llama-2-7b", {}).p_iter == 0.05
    assert build_config(None, {"model": "tiny", "p_iter": 0.2, "sparsity": 0.5}).p_iter == 0.2
    cfg = PruneConfig(model="tiny", sparsity=0.5).validate()
    budget = PruneRun(cfg, tmp_path / "out", dry_run=True).budget
    assert budget.iterations == 2 and budget.step == pytest.approx(budget.target_removed / 2)


def test_compensation_follows_the_refit():
    """Sub-models are compensated for the lstsq refit to come, and not when none (or only FLAP's bias) comes."""
    assert PruneConfig(model="tiny").validate().compensate
    assert not PruneConfig(model="tiny", reconstruct="none").validate().compensate
    assert not PruneConfig(model="tiny", reconstruct="bias").validate().compensate
    assert not build_config(None, {"model": "tiny", "reconstruct": "none"}).compensate
    assert build_config(None, {"model": "tiny", "reconstruct": "none", "compensate": True}).compensate  # a flag wins


def test_sequential_obs_is_the_default_of_the_probe_selection_under_the_lstsq_refit(tmp_path):
    """On by default where it was measured (bonsai's probes, obs prior, lstsq); off wherever the compensated
    errors are not what ranks the units; a flag wins; a run checkpointed before the setting existed (which
    ranked by single errors) is refused rather than resumed as if it had ordered its units sequentially."""
    from bonsai.errors import BonsaiError

    assert PruneConfig(model="tiny").validate().sequential_obs
    assert not PruneConfig(model="tiny", reconstruct="none").validate().sequential_obs
    assert not PruneConfig(model="tiny", reconstruct="bias").validate().sequential_obs
    assert not PruneConfig(model="tiny", method="prior-only").validate().sequential_obs
    assert not PruneConfig(model="tiny", selection="paper", prior="wanda").validate().sequential_obs
    assert not PruneConfig(model="tiny", method="flap").validate().sequential_obs
    assert not build_config(None, {"model": "tiny", "sequential_obs": False}).sequential_obs
    kw = dict(model="tiny", sparsity=0.1, p_iter=0.1, seqlen=32, calib_samples=2, reconstruct_samples=4)
    prune(tmp_path / "o", **kw)
    path = tmp_path / "o" / ".bonsai" / "state.json"
    state = json.loads(path.read_text())
    assert state["fingerprint"]["sequential_obs"] is True
    del state["fingerprint"]["sequential_obs"]
    path.write_text(json.dumps(state))
    with pytest.raises(BonsaiError, match="sequential_obs"):
        prune(tmp_path / "o", **kw)
    prune(tmp_path / "o", sequential_obs=False, **kw)  # what that run did: it resumes (here: nothing left to do)


def test_a_run_checkpointed_before_the_residual_target_resumes_only_as_own(tmp_path):
    """The refit target became `residual` after runs were checkpointed with the own-output refit: such a state (no
    refit_target in its fingerprint) is refused with the setting named, and resumes with --refit-target own."""
    from bonsai.errors import BonsaiError

    assert PruneConfig(model="tiny").validate().refit_target == "residual"
    kw = dict(model="tiny", sparsity=0.1, p_iter=0.1, seqlen=32, calib_samples=2, reconstruct_samples=4)
    prune(tmp_path / "o", refit_target="own", **kw)
    path = tmp_path / "o" / ".bonsai" / "state.json"
    state = json.loads(path.read_text())
    assert state["fingerprint"]["refit_target"] == "own"
    del state["fingerprint"]["refit_target"]
    path.write_text(json.dumps(state))
    with pytest.raises(BonsaiError, match="refit_target"):
        prune(tmp_path / "o", **kw)
    prune(tmp_path / "o", refit_target="own", **kw)  # what that run did: it resumes (here: nothing left to do)


def test_adaptive_needs_the_paper_selection():
    from bonsai.errors import BonsaiError

    with pytest.raises(BonsaiError, match="--selection paper"):
        PruneConfig(model="tiny", adaptive=True).validate()
    with pytest.raises(BonsaiError, match="even"):
        PruneConfig(model="tiny", adaptive=True, selection="paper", adaptive_round=5).validate()


def test_runs_checkpointed_before_a_new_setting_existed_still_resume(tmp_path):
    """A state written by a version without a setting resumes when that setting is at its default (what the
    older version did), and is refused when it is not."""
    from bonsai.errors import BonsaiError

    kw = dict(model="tiny", sparsity=0.1, p_iter=0.1, samples=4, seqlen=32, calib_samples=2)
    prune(tmp_path / "o", **kw)
    path = tmp_path / "o" / ".bonsai" / "state.json"
    state = json.loads(path.read_text())
    del state["fingerprint"]["candidate_multiple"], state["fingerprint"]["adaptive"]
    path.write_text(json.dumps(state))
    _, report = prune(tmp_path / "o", **kw)  # finished: nothing to do, no refusal
    assert_within_one_unit(report, 0.1, report["totals"]["max_unit_params"])
    with pytest.raises(BonsaiError, match="candidate_multiple"):
        prune(tmp_path / "o", candidate_multiple=3.0, **kw)


@pytest.mark.heavy
def test_a_resumed_run_refits_on_the_window_count_it_started_with(tmp_path, monkeypatch):
    """The refit windows' default has changed between versions: a resumed run keeps the count its state holds,
    and a state from before the count was stored resumes with what those versions used (--calib-samples)."""
    import bonsai.engine.reconstruction as reconstruct
    from bonsai.methods.bonsai import runner as runner_mod

    class Crash(Exception):
        pass

    kw = dict(model="tiny", sparsity=0.2, p_iter=0.1, calib_samples=4)
    counts: list[tuple[int, int]] = []
    original = runner_mod.PruneRun._recon_windows

    def recording(self, t):
        if crash_at is not None and t == crash_at:
            raise Crash
        windows = original(self, t)
        counts.append((t, windows.shape[0]))
        return windows

    monkeypatch.setattr(runner_mod.PruneRun, "_recon_windows", recording)
    parent = get_adapter(load_model("tiny", device="cpu"))
    widest = max(parent.output_projection(k).in_features for k in parent.groups())
    started = math.ceil(REFIT_TOKENS_PER_COLUMN * widest / FAST["seqlen"])
    for out, legacy in (("kept", False), ("legacy", True)):
        counts.clear()
        crash_at = 1
        with pytest.raises(Crash):
            prune(tmp_path / out, **kw)
        path = tmp_path / out / ".bonsai" / "state.json"
        state = json.loads(path.read_text())
        assert state["completed_iterations"] == 1 and state["refit_windows"] == started
        if legacy:
            del state["refit_windows"]
            path.write_text(json.dumps(state))
        monkeypatch.setattr(reconstruct, "REFIT_TOKENS_PER_COLUMN", 2 * REFIT_TOKENS_PER_COLUMN)  # a new default
        counts.clear()
        crash_at = None
        _, report = prune(tmp_path / out, **kw)
        monkeypatch.undo()
        monkeypatch.setattr(runner_mod.PruneRun, "_recon_windows", recording)
        expected = kw["calib_samples"] if legacy else started
        assert counts and {n for t, n in counts if t >= 1} == {expected}
        assert report["refit_windows"] == expected
