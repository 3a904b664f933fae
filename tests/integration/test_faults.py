"""Fault injection: damaged checkpoints and model files, kills, a full disk, two runs on one folder, bad parents.

Every case drives the CLI in a subprocess (or the runner in-process where a write must be made to fail) and
checks what a user sees: one line naming the file and the way out, a non-zero exit, no traceback, and, where
the run can go on, a resumed result with the bytes of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bonsai.models.aliases import TINY_MODEL_DIR

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("faults")]  # one worker builds the runs fixture

PRUNE = [sys.executable, "-m", "bonsai", "prune", "--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.1",
         "--samples", "6", "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "8",
         "--reconstruct-samples", "6"]


def bonsai(args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    """The run failed with exit 2 and a single `bonsai: error:` line holding `words`; returns that line."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("bonsai: error:")]
    assert len(lines) == 1, done.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def flip_a_byte(path: Path, from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x40
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """An uninterrupted run, and one that crashed in iteration 2's reconstruction: its folder holds the
    state, the refit weights of iteration 1 and the finished sub-models of iteration 2."""
    root = tmp_path_factory.mktemp("faults")
    done = bonsai(PRUNE + ["--out", str(root / "straight")])
    assert done.returncode == 0, done.stderr
    crashed = bonsai(PRUNE + ["--out", str(root / "crashed")], env={"BONSAI_ABORT_IN_RECONSTRUCTION": "2:1"})
    assert crashed.returncode == 75, crashed.stderr
    state = root / "crashed" / ".bonsai"
    assert (state / "iteration.safetensors").exists() and (state / "weights-1.safetensors").exists()
    return root


def copy_of(runs: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(runs / "crashed", out)
    return out


@pytest.mark.heavy
def test_own_target_resumes_mid_reconstruction_to_the_same_bytes(runs, tmp_path):
    """--refit-target own (each projection refit to its own output; the default refits to the residual stream, which
    the fixture's runs cover): a crash in the middle of its refit resumes to the bytes of an uninterrupted run, and
    it is another model than the default's."""
    args = PRUNE + ["--refit-target", "own"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert bonsai(args + ["--out", str(straight)]).returncode == 0
    first = bonsai(args + ["--out", str(crashed)], env={"BONSAI_ABORT_IN_RECONSTRUCTION": "2:1"})
    assert first.returncode == 75, first.stderr[-2000:]
    done = bonsai(args + ["--out", str(crashed)])
    assert done.returncode == 0, done.stderr[-2000:]
    same_weights(crashed, straight)
    report = json.loads((straight / "report.json").read_text())
    assert report["settings"]["refit_target"] == "own"
    assert json.loads((runs / "straight" / "report.json").read_text())["settings"]["refit_target"] == "residual"
    default = load_file(str(runs / "straight" / "model.safetensors"))
    assert any(not torch.equal(default[k], v) for k, v in load_file(str(straight / "model.safetensors")).items()
               if default[k].shape == v.shape)


@pytest.mark.parametrize("damage", [truncate, lambda p: p.write_text("{\"fingerprint\": ")])
def test_damaged_state_is_refused_with_the_way_out(runs, tmp_path, damage):
    out = copy_of(runs, tmp_path)
    damage(out / ".bonsai" / "state.json")
    one_line_error(bonsai(PRUNE + ["--out", str(out)]), "state.json", "--force")
    assert (out / ".bonsai" / "weights-1.safetensors").exists()  # refusing destroys nothing


@pytest.mark.parametrize("damage", [truncate, flip_a_byte])
def test_damaged_refit_weights_are_refused(runs, tmp_path, damage):
    out = copy_of(runs, tmp_path)
    damage(out / ".bonsai" / "weights-1.safetensors")  # a flipped byte is caught by the checksum
    one_line_error(bonsai(PRUNE + ["--out", str(out)]), "weights-1.safetensors", "--force")


@pytest.mark.parametrize("damage", [pytest.param(truncate, marks=pytest.mark.slow), flip_a_byte])
def test_damaged_iteration_checkpoint_is_recomputed_to_the_same_bytes(runs, tmp_path, damage):
    out = copy_of(runs, tmp_path)
    damage(out / ".bonsai" / "iteration.safetensors")
    done = bonsai(PRUNE + ["--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert "discarding" in done.stderr and "evaluated again" in done.stderr
    same_weights(out, runs / "straight")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"])
def test_damaged_model_files_are_named(tmp_path, name):
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model)
    truncate(model / name)
    one_line_error(bonsai([sys.executable, "-m", "bonsai", "eval", "kjv", "--model", str(model),
                           "--max-windows", "1"]), str(model), "re-download")
    if name == "model.safetensors":
        one_line_error(bonsai(PRUNE[:5] + [str(model)] + PRUNE[6:] + ["--out", str(tmp_path / "out")]), str(model))
        assert not (tmp_path / "out").exists()


@pytest.mark.heavy
def test_sigterm_says_how_to_resume_and_the_resume_is_exact(runs, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(PRUNE + ["--out", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / ".bonsai" / "iteration.safetensors").exists():  # in the middle of iteration 1's sub-models
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("bonsai: terminated;")
    assert "same command" in err
    assert not list(out.parent.glob(f".{out.name}.lock"))  # released on the way out
    done = bonsai(PRUNE + ["--out", str(out)])
    assert done.returncode == 0, done.stderr
    same_weights(out, runs / "straight")


@pytest.mark.heavy
def test_second_run_on_the_same_folder_is_refused_and_a_stale_lock_is_not(tmp_path):
    from bonsai.runlock import RunLock

    out = tmp_path / "run"
    args = PRUNE + ["--method", "random", "--reconstruct", "none", "--out", str(out)]
    with RunLock(out):  # as if another run were writing there
        one_line_error(bonsai(args), "another bonsai run", f"pid {os.getpid()}")
    assert not out.exists()
    # a killed run leaves its lock file behind, but no process holds it any more
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": 999999, "host": "x", "started": 0}))
    done = bonsai(args)
    assert done.returncode == 0, done.stderr


def test_nan_parent_is_refused_before_anything_is_touched(tmp_path, runs):
    from bonsai.models.loading import load_model, load_tokenizer
    from bonsai.models.saving import save_pruned

    model = load_model(TINY_MODEL_DIR, dtype="float32", device="cpu")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    save_pruned(model, load_tokenizer(TINY_MODEL_DIR), tmp_path / "nan", structured=False)
    out = tmp_path / "out"
    shutil.copytree(runs / "straight", out)  # a finished output that --force must not lose to a refused run
    before = (out / "model.safetensors").read_bytes()
    for method in ("bonsai", "flap"):
        one_line_error(bonsai(PRUNE[:5] + [str(tmp_path / "nan")] + PRUNE[6:] + ["--method", method, "--out", str(out),
                                                                                 "--force"]),
                       "NaN/inf", "model.layers.1.mlp.down_proj.weight")
        assert (out / "model.safetensors").read_bytes() == before


def test_calibration_text_shorter_than_a_window_is_refused_before_work(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("In the beginning God created the heaven and the earth.\n")
    out = tmp_path / "out"
    for method in ("bonsai", "llm-pruner"):
        one_line_error(bonsai(PRUNE + ["--calib", str(text), "--seqlen", "64", "--method", method, "--out", str(out)]),
                       "too few for calibration windows")
        assert not out.exists()


@pytest.mark.heavy
def test_full_disk_keeps_the_previous_checkpoint_and_finished_output(tmp_path, monkeypatch):
    import safetensors.torch

    from bonsai.io import DiskFull
    from bonsai.models.loading import load_model, load_tokenizer
    from bonsai.models.saving import save_pruned
    from bonsai.methods.settings import PruneConfig
    from bonsai.methods.bonsai.runner import PruneRun

    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def full_after(n: int):
        def save_file(tensors, filename, metadata=None):
            calls["n"] += 1
            if calls["n"] > n:
                with open(filename, "wb") as f:  # part of the bytes made it to disk before the device filled up
                    f.write(b"\0" * 16)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(tensors, filename, metadata=metadata)
        return save_file

    cfg = dict(model="tiny", sparsity=0.2, p_iter=0.1, samples=6, calib="kjv", seqlen=32, calib_samples=4,
               batch_size=8, reconstruct_samples=6, checkpoint_every=2)
    straight = tmp_path / "straight"
    PruneRun(PruneConfig(**cfg).validate(), straight).run()

    out = tmp_path / "run"
    monkeypatch.setattr(safetensors.torch, "save_file", full_after(4))  # a few checkpoints, then the disk is full
    with pytest.raises(DiskFull, match="no space left"):
        PruneRun(PruneConfig(**cfg).validate(), out).run()
    assert not [p for p in (out / ".bonsai").iterdir() if p.name.endswith(".tmp")]  # no half-written file left
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    PruneRun(PruneConfig(**cfg).validate(), out).run()  # resumes from the checkpoint the full disk did not touch
    same_weights(out, straight)

    # killed while writing the finished model: the state says finished, the rerun saves it again
    import bonsai.models.saving

    class Killed(BaseException):
        pass

    def killed(tmp, out):
        raise Killed()

    out = tmp_path / "killed-in-save"
    monkeypatch.setattr(bonsai.models.saving, "atomic_replace", killed)
    with pytest.raises(Killed):
        PruneRun(PruneConfig(**cfg).validate(), out).run()
    monkeypatch.undo()
    assert json.loads((out / ".bonsai" / "state.json").read_text())["finished"] and not (out / "config.json").exists()
    PruneRun(PruneConfig(**cfg).validate(), out).run()
    same_weights(out, straight)

    # a finished output survives a save that runs out of space
    before = {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()}
    model = load_model(TINY_MODEL_DIR, dtype="float32", device="cpu")
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_after(0))
    with pytest.raises(DiskFull):
        save_pruned(model, load_tokenizer(TINY_MODEL_DIR), straight, overwrite=True)
    assert {p.name: p.read_bytes() for p in straight.iterdir() if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_damaged_teacher_cache_shard_is_rebuilt(tmp_path):
    from bonsai.finetune.teacher_cache import SHARD_WINDOWS, find_or_build

    windows = torch.randint(0, 200, (SHARD_WINDOWS + 3, 16))
    cache, info = find_or_build("tiny", windows, 8, tmp_path, batch_size=16, dtype="float32", device="cpu")
    assert not info["reused"]
    shard = cache.path / "shard-00001.safetensors"
    original = {k: v.clone() for k, v in load_file(str(shard)).items()}
    flip_a_byte(shard, from_end=3)
    cache, info = find_or_build("tiny", windows, 8, tmp_path, batch_size=16, dtype="float32", device="cpu")
    assert not info["reused"]  # the damaged shard was rebuilt, the intact one kept
    rebuilt = load_file(str(shard))
    assert all(torch.equal(original[k], rebuilt[k]) for k in original)
    _, info = find_or_build("tiny", windows, 8, tmp_path, batch_size=16, dtype="float32", device="cpu")
    assert info["reused"]


@pytest.mark.heavy
def test_damaged_finetune_checkpoint_is_refused(tmp_path):
    args = [sys.executable, "-m", "bonsai", "finetune", "--model", "tiny", "--teacher", "tiny", "--data", "kjv",
            "--lora-rank", "4", "--seqlen", "32", "--samples", "32", "--steps", "6", "--batch-size", "4",
            "--eval-windows", "2", "--checkpoint-every", "3", "--top-k", "8", "--device", "cpu",
            "--out", str(tmp_path / "ft")]
    crashed = bonsai(args, env={"BONSAI_ABORT_AFTER_STEPS": "3"})
    assert crashed.returncode == 75, crashed.stderr
    ckpt = tmp_path / "ft" / ".bonsai-finetune" / "checkpoint"
    truncate(ckpt / "optimizer.pt")
    line = one_line_error(bonsai(args + ["--resume"]), "optimizer.pt", "--force")
    assert f"delete {ckpt}" in line  # the other way out: train again from step 0, keeping the teacher cache
    assert (ckpt / "trainable.safetensors").exists()  # refusing destroys nothing


@pytest.mark.slow
def test_damaged_besa_block_is_learned_again(tmp_path, random_checkpoints):
    args = [sys.executable, "-m", "bonsai", "prune", "--model", str(random_checkpoints["llama"]), "--method", "besa",
            "--sparsity", "0.5", "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "1"]
    crashed = bonsai(args + ["--out", str(tmp_path / "r")], env={"BONSAI_ABORT_AFTER_BLOCKS": "2"})
    assert crashed.returncode == 75, crashed.stderr
    flip_a_byte(tmp_path / "r" / ".bonsai" / "besa-block-1.safetensors")
    resumed = bonsai(args + ["--out", str(tmp_path / "r")])
    assert resumed.returncode == 0, resumed.stderr
    assert "besa-block-1.safetensors" in resumed.stderr
    straight = bonsai(args + ["--out", str(tmp_path / "s")])
    assert straight.returncode == 0, straight.stderr
    same_weights(tmp_path / "r", tmp_path / "s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_killed_repeatedly_at_random_points_finishes_with_the_same_bytes(runs, tmp_path, sig):
    """Kill the run at seeded random moments, three times, then let it finish: the bytes of the straight run."""
    rng = random.Random(int(sig))
    out = tmp_path / "run"
    for _ in range(3):
        proc = subprocess.Popen(PRUNE + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(rng.uniform(4.0, 20.0))  # start-up takes a few seconds; a run takes about 30
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
        assert "Traceback" not in err, err
        if proc.returncode == 0:
            break
        assert proc.returncode == {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}[sig], err
    done = bonsai(PRUNE + ["--out", str(out)])
    assert done.returncode == 0, done.stderr
    same_weights(out, runs / "straight")
