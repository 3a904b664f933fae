#!/usr/bin/env python
"""One full bonsai iteration end to end at a model's shape (random weights: speed and memory only), per stage.

Builds the model from a config on the device (no download), then runs the first iteration of `bonsai prune`'s
runner with a preset's settings (default `bonsai/configs/llama-2-7b.yaml`: 32 x 2048 calibration tokens, p_iter 0.3,
probes, compensated sub-models, sequential OBS, the lstsq refit, width multiple 256) on the shipped KJV text,
timing each stage by wrapping the runner's own methods. Prints seconds and peak memory per stage, the peak
against a plain forward with the same batch, and the whole run projected from the cost model (an iteration
costs in proportion to the parameters left).

  python scripts/bench_iteration.py --shape llama-2-7b --device cuda --dtype bfloat16 --json runs/iter7b.json
  python scripts/bench_iteration.py --shape small --device cpu --dtype float32 --calib-samples 4 --seqlen 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import wraps
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without installing
from bench_prune import SHAPES, build, peak, peak_reset, sync  # noqa: E402

from bonsai.runtime import configure_threads  # noqa: E402

configure_threads()

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    p.add_argument("--config", default="llama-2-7b", help="preset whose settings the iteration runs with")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--calib-samples", type=int, help="override the preset's calibration windows")
    p.add_argument("--seqlen", type=int, help="override the preset's window length")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()

    from bonsai.models.loading import load_tokenizer
    from bonsai.progress import make_progress
    from bonsai.methods.bonsai import runner as runner_module
    from bonsai.methods.bonsai import search as search_module
    from bonsai.methods.settings import build_config
    from bonsai.methods.bonsai.cost import estimate
    from bonsai.methods.bonsai.runner import PruneRun
    from bonsai.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, torch.bfloat16)
    model = build(argparse.Namespace(shape=args.shape, model=None), device, dtype)
    overrides = {"calib": "kjv", "calib_samples": args.calib_samples, "seqlen": args.seqlen,
                 "batch_size": args.batch_size, "device": str(device)}
    cfg = build_config(args.config, overrides)
    tokenizer = load_tokenizer("tiny")  # ids below every shape's vocabulary; the text only has to be long enough

    stages: dict[str, dict] = {}

    def timed(name: str, fn):
        @wraps(fn)
        def wrapper(*a, **kw):
            sync(device)
            start = time.perf_counter()
            out = fn(*a, **kw)
            sync(device)
            entry = stages.setdefault(name, {"seconds": 0.0, "calls": 0})
            entry["seconds"] += time.perf_counter() - start
            entry["calls"] += 1
            entry["peak_bytes"] = max(entry.get("peak_bytes", 0), peak(device))
            return out
        return wrapper

    search_module.prior_pass = timed("prior pass (+ reference distributions)", search_module.prior_pass)
    runner_module.unit_scores = timed("scores", runner_module.unit_scores)
    PruneRun._gram_pass = timed("unit errors (Gram, H^-1, sequential OBS)", PruneRun._gram_pass)
    PruneRun._evaluate_pending = timed("sub-models", PruneRun._evaluate_pending)
    PruneRun._apply = timed("slice + refit", PruneRun._apply)
    PruneRun._save = timed("checkpoint", PruneRun._save)

    with tempfile.TemporaryDirectory() as tmp:
        run = PruneRun(cfg, Path(tmp) / "run", model=model, tokenizer=tokenizer)
        windows = run._windows(0)
        with torch.no_grad():  # the inference baseline: a plain forward with the same batch
            model(windows[: args.batch_size].to(device), use_cache=False)
            peak_reset(device)
            sync(device)
            start = time.perf_counter()
            for i in range(0, len(windows), args.batch_size):
                model(windows[i:i + args.batch_size].to(device), use_cache=False)
            sync(device)
        plain_s, plain_peak = time.perf_counter() - start, peak(device)
        cost = estimate(cfg, model, run.adapter, run.groups, run.seqlen, run.budget.iterations, False)
        peak_reset(device)
        state = run._initial_state()
        start = time.perf_counter()
        with make_progress() as progress:
            run._progress = progress
            run._iteration(0, state, progress)
            state.completed_iterations = 1
            run._save(state)
        iteration_s = time.perf_counter() - start
    iteration_peak = peak(device)
    iters = run.budget.iterations
    left = [1.0 - cfg.sparsity * t / iters for t in range(iters)]
    projected = iteration_s * sum(left) / left[0]
    h = state.history[0]
    res = {"shape": args.shape, "device": str(device), "dtype": str(dtype), "config": args.config,
           "calib_samples": cfg.calib_samples, "seqlen": run.seqlen, "batch_size": args.batch_size,
           "iterations": iters, "sub_models": h["sub_models"], "iteration_s": iteration_s, "stages": stages,
           "plain_forward_s": plain_s, "plain_forward_peak_bytes": plain_peak, "iteration_peak_bytes": iteration_peak,
           "peak_ratio": iteration_peak / plain_peak, "projected_run_s": projected,
           "cost_model_s": cost.seconds, "sparsity_after": h["sparsity"]}
    gib = 2 ** 30
    print(f"{args.shape} on {device} ({dtype}), preset {args.config}: {cfg.calib_samples} x {run.seqlen} tokens, "
          f"batch {args.batch_size}, {h['sub_models']} sub-models, sparsity after one iteration {h['sparsity']:.3f}")
    for name, e in stages.items():
        print(f"  {name:42s} {e['seconds']:9.1f} s  ({e['calls']} call(s), peak {e['peak_bytes'] / gib:.2f} GiB)")
    print(f"  {'one iteration':42s} {iteration_s:9.1f} s")
    print(f"peak memory: iteration {iteration_peak / gib:.2f} GiB / plain forward {plain_peak / gib:.2f} GiB = "
          f"{res['peak_ratio']:.3f}x")
    print(f"whole run ({iters} iterations, each in proportion to the parameters left): ~{projected / 3600:.2f} h "
          f"(the cost model's estimate before starting: {cost.seconds / 3600:.2f} h)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
