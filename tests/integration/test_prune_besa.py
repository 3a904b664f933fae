"""`bonsai prune --method besa` on the shipped tiny model: learning lowers block error, hits the target, beats Wanda."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bonsai.methods.one_shot import OneShotRun
from bonsai.eval.runner import run_perplexity
from bonsai.methods.settings import PruneConfig

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("besa")]  # one worker builds the runs fixture

CALIB = dict(calib="kjv", seqlen=128, calib_samples=64, batch_size=1)


def prune(out, **kw):
    cfg = PruneConfig(model="tiny", sparsity=0.5, **{**CALIB, **kw}).validate()
    return OneShotRun(cfg, out).run()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("besa")
    return root, prune(root / "besa", method="besa"), prune(root / "wanda", method="wanda")


def test_besa_learns_allocations_that_beat_uniform(runs):
    root, besa, wanda = runs
    assert abs(besa["totals"]["sparsity"] - 0.5) < 0.005
    for block in besa["reconstruction"]:
        assert block["mse_learned"] < block["mse_uniform"]  # block reconstruction error falls with learning
    per_linear = [v for layer in besa["linear_sparsity"] for v in layer.values()]
    assert np.std(per_linear) > 0.01  # learned sparsities differ across layers
    saved = json.loads((root / "besa" / "report.json").read_text())
    assert saved["settings"]["besa_granularity"] == "row" and (root / "besa" / "report.png").stat().st_size > 0
    ppl_besa = run_perplexity("kjv", str(root / "besa"), seqlen=512)["ppl"]
    ppl_wanda = run_perplexity("kjv", str(root / "wanda"), seqlen=512)["ppl"]
    assert ppl_besa <= ppl_wanda


@pytest.mark.heavy
def test_besa_resumes_block_by_block(tmp_path, random_checkpoints):
    args = [sys.executable, "-m", "bonsai", "prune", "--model", str(random_checkpoints["llama"]), "--method", "besa",
            "--sparsity", "0.5", "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "1"]
    crashed = subprocess.run(args + ["--out", str(tmp_path / "r")], capture_output=True, text=True,
                             env=dict(os.environ, BONSAI_ABORT_AFTER_BLOCKS="2"))
    assert crashed.returncode == 75, crashed.stderr
    assert len(json.loads((tmp_path / "r" / ".bonsai" / "besa-run.json").read_text())["blocks"]) == 2
    resumed = subprocess.run(args + ["--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(args + ["--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a, b = load_file(str(tmp_path / "r" / "model.safetensors")), load_file(str(tmp_path / "s" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
