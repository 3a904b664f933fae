"""What a run prints where no terminal reads it: whole tables, plain progress lines, and `--log-json`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

TINY_RUN = ["--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.1", "--calib", "kjv", "--seqlen", "32",
            "--calib-samples", "4", "--reconstruct-samples", "4", "--batch-size", "8"]


def bonsai(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, COLUMNS="", **(env or {}))
    environment.pop("COLUMNS")
    return subprocess.run([sys.executable, "-m", "bonsai", *args], capture_output=True, text=True, timeout=600,
                          env=environment)


def test_a_logged_run_prints_whole_tables_and_plain_progress_lines(tmp_path):
    """Written to pipes (a log file, CI, nohup), the per-iteration table keeps its headers and numbers whole and every
    long loop reports in plain lines that say how far it got."""
    done = bonsai("prune", *TINY_RUN, "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "…" not in done.stdout
    header = next(line for line in done.stdout.splitlines() if "iteration" in line)
    for column in ("iteration", "sparsity", "sub-models", "probe cost min", "calib ppl", "seconds"):
        assert column in header
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert f"{report['totals']['sparsity']:.4f}" in done.stdout
    lines = done.stderr.splitlines()
    assert any(line.startswith("sub-models (iter 1) started: 0/") for line in lines)
    assert any(line.startswith("sub-models (iter 1) done: ") for line in lines)
    assert any(line.startswith("reconstruction done: ") for line in lines)


def test_log_json_gives_one_line_per_iteration_and_the_totals(tmp_path):
    done = bonsai("prune", *TINY_RUN, "--out", str(tmp_path / "out"), "--log-json", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]  # stdout holds JSON lines only
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert records[:-1] == json.loads(json.dumps(report["iterations"]))
    assert records[-1]["totals"] == report["totals"]
    assert "started" not in done.stderr  # --quiet: no progress
