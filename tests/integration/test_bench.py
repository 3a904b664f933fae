"""`bonsai bench`: JSON layout with speedup per setting, and refusal of a baseline with another tokenizer."""

import json

import pytest

from bonsai.cli import main

pytestmark = pytest.mark.integration


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["bonsai", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr()


def test_bench_json_has_speedup_per_setting(monkeypatch, capsys, tmp_path, random_checkpoints):
    out = tmp_path / "b.json"
    src = str(random_checkpoints["llama"])
    code, _ = run(monkeypatch, capsys, "bench", "--model", src, "--baseline", "tiny", "--seqlen", "32", "--batch-sizes",
                  "1,2", "--generate-tokens", "4", "--repeats", "1", "--device", "cpu", "--json", str(out))
    assert code == 0
    r = json.loads(out.read_text())
    assert set(r["speedup"]) == {"forward_b1", "forward_b2", "generate_b1", "generate_b2"}
    for row in r["results"]:
        assert row["speedup"] == pytest.approx(row["forward_seconds_baseline"] / row["forward_seconds_model"])
    assert r["param_ratio"] == pytest.approx(r["models"]["model"]["params"] / r["models"]["baseline"]["params"])


def test_bench_refuses_a_baseline_with_another_tokenizer(monkeypatch, capsys, tmp_path, random_checkpoints, tiny_tokenizer):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(random_checkpoints["llama"], other)
    tok = tiny_tokenizer.__class__.from_pretrained(str(other))
    tok.add_tokens(["<bonsai-extra>"])
    tok.save_pretrained(other)
    code, captured = run(monkeypatch, capsys, "bench", "--model", "tiny", "--baseline", str(other), "--device", "cpu")
    assert code == 2 and "different tokenizers" in captured.err and len(captured.err.strip().splitlines()) == 1


@pytest.mark.heavy
def test_one_iteration_benchmark_times_every_stage_of_the_runner(tmp_path):
    """`scripts/bench_iteration.py` (the 7B-shape GPU row of issue 13) runs the runner's first iteration: its
    stages are the runner's own, their seconds fit inside the iteration, and the run is projected from it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "iter.json"
    subprocess.run([sys.executable, str(root / "scripts" / "bench_iteration.py"), "--shape", "small", "--device", "cpu",
                    "--dtype", "float32", "--calib-samples", "2", "--seqlen", "64", "--json", str(out)],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    res = json.loads(out.read_text())
    assert res["sub_models"] == 2 * 4  # the probe selection: one sub-model per group of the 4-layer shape
    assert {"sub-models", "slice + refit", "unit errors (Gram, H^-1, sequential OBS)"} <= set(res["stages"])
    assert all(s["calls"] >= 1 for s in res["stages"].values())
    timed = sum(s["seconds"] for name, s in res["stages"].items() if name != "checkpoint")
    assert 0 < timed <= res["iteration_s"]
    left = [1 - 0.5 * t / res["iterations"] for t in range(res["iterations"])]
    assert res["projected_run_s"] == pytest.approx(res["iteration_s"] * sum(left))
    assert 0 < res["sparsity_after"] < 0.5
