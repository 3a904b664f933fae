"""`bonsai prune` end to end on the shipped tiny model and on random LLaMA / Mistral (GQA) / Phi models."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from bonsai.eval.runner import run_perplexity
from bonsai.models.loading import load_model
from bonsai.prune.config import PruneConfig
from bonsai.prune.runner import PruneRun

pytestmark = pytest.mark.integration

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
    return root, runs


def test_tiny_sparsity_reached_within_one_unit(tiny_runs):
    root, runs = tiny_runs
    report = json.loads((root / "bonsai" / "report.json").read_text())
    t = report["totals"]
    removed = t["block_params_before"] - t["block_params_after"]
    target = 0.3 * t["block_params_before"]
    assert 0 <= removed - target < t["max_unit_params"]
    assert len(report["iterations"]) >= 3
    for h in report["iterations"]:
        assert h["sub_models"] == 32 and h["cv_tau"] is not None and h["penalty"] > 0
    assert (root / "bonsai" / "report.png").stat().st_size > 0


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


def test_bonsai_beats_random(tiny_runs):
    root, _ = tiny_runs
    ppl = {m: run_perplexity("kjv", str(root / m), seqlen=128, batch_size=16, device="cpu")["ppl"]
           for m in ("bonsai", "random")}
    assert ppl["bonsai"] < ppl["random"]


def test_resume_equals_uninterrupted(tmp_path):
    args = [sys.executable, "-m", "bonsai", "prune", "--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.1",
            "--samples", "8", "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "8",
            "--checkpoint-every", "2"]
    env = dict(os.environ, BONSAI_ABORT_AFTER_EVALS="12")  # dies in the second iteration, mid-way
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
    assert report["totals"]["sparsity"] >= 0.25
    reloaded = load_model(str(tmp_path / family), device="cpu")
    ids = torch.randint(0, 4000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, run.model(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prior-only", "no-regression"])
def test_ablations_run(method, tmp_path):
    run, report = prune(tmp_path / method, model="tiny", sparsity=0.1, p_iter=0.1, samples=8, method=method)
    assert report["totals"]["sparsity"] >= 0.1
    assert math.isfinite(report["iterations"][0]["calib_ppl"])


def test_other_settings_refused_then_forced(tmp_path):
    from bonsai.errors import BonsaiError

    prune(tmp_path / "o", model="tiny", sparsity=0.1, p_iter=0.1, samples=4, seqlen=32, calib_samples=2)
    with pytest.raises(BonsaiError, match="other settings"):
        prune(tmp_path / "o", model="tiny", sparsity=0.1, p_iter=0.1, samples=4, seqlen=32, calib_samples=2, seed=1)
    cfg = PruneConfig(**dict(FAST, model="tiny", sparsity=0.1, p_iter=0.1, samples=4, seqlen=32, calib_samples=2,
                             seed=1)).validate()
    PruneRun(cfg, tmp_path / "o", force=True).run()
    assert json.loads((tmp_path / "o" / "report.json").read_text())["settings"]["seed"] == 1


def test_two_processes_equal_one(tmp_path):
    """Sub-model evaluations spread over 2 CPU processes (gloo) give the single-process model exactly."""
    args = [sys.executable, "-m", "bonsai", "prune", "--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.1",
            "--samples", "8", "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "8",
            "--checkpoint-every", "2"]
    one = subprocess.run(args + ["--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=600)
    two = subprocess.run(args + ["--out", str(tmp_path / "two"), "--processes", "2"], capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = json.loads((tmp_path / "one" / "report.json").read_text())["iterations"]
    rb = json.loads((tmp_path / "two" / "report.json").read_text())["iterations"]
    assert [h["cv_tau"] for h in ra] == [h["cv_tau"] for h in rb]


def test_non_finite_utilities_are_left_out(tmp_path, monkeypatch):
    """An fp16 overflow in some sub-models is logged and kept out of the fit, never a crash."""
    import numpy as np

    from bonsai.prune import evaluate

    original = evaluate.SubModelEvaluator.evaluate

    def overflowing(self, samples, on_row=None):
        utility, prior = original(self, samples, on_row)
        utility = np.where(np.array(samples) % 3 == 0, -np.inf, utility)
        return utility, prior

    monkeypatch.setattr(evaluate.SubModelEvaluator, "evaluate", overflowing)
    _, report = prune(tmp_path / "o", model="tiny", sparsity=0.1, p_iter=0.1, samples=12)
    it = report["iterations"][0]
    assert it["non_finite"] == 4 and it["cv_tau"] is not None


def test_prune_with_accelerate_placement(tmp_path):
    """--device-map hands placement to accelerate (the path for models larger than one device)."""
    run, report = prune(tmp_path / "o", model="tiny", sparsity=0.1, p_iter=0.1, samples=4, device_map="cpu")
    assert report["totals"]["sparsity"] >= 0.1
    reloaded = load_model(str(tmp_path / "o"), device="cpu")
    ids = torch.randint(0, 4000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, run.model(ids).logits, atol=1e-5, rtol=0)
