#!/usr/bin/env python
"""Benchmark one Bonsai iteration against plain inference, side by side in one run.

Prints: time per sub-model evaluation vs a plain forward over the same tokens; peak memory of the
prune steps vs a plain forward with the same batch (GPU: max allocated; CPU: peak RSS); the
regression's share of an iteration's time; and the forward speedup of a model sliced to a sparsity.
With `--cheaper`, four ways to make a sub-model cheaper, each as a ratio to a plain forward over the same
tokens, measured side by side: (a) 4x more, 4x shorter windows at equal tokens; (b) one sub-model evaluated
with its dropped units physically skipped (its kept rows and columns gathered by index_select into a
functional forward) instead of zeroed by masks; (c) bfloat16 instead of float32 (CPU); (d) the probe
selection's one-group sub-models started at their own block from the current model's kept states.

  python scripts/bench_prune.py --model tiny --seqlen 128 --windows 16 --batch-size 16
  python scripts/bench_prune.py --model runs/models/smollm2-135m --seqlen 512 --windows 8 --batch-size 8 --cheaper
  python scripts/bench_prune.py --shape llama-2-7b --device cuda --dtype bfloat16 --seqlen 2048 --windows 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without installing
from bonsai.runtime import configure_threads  # noqa: E402

configure_threads()

from shapes import SHAPES, build_shape  # noqa: E402  (random weights from a real family's config)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn, device, repeats=3):
    out, times = None, []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def build(args, device, dtype):
    if args.shape:
        return build_shape(args.shape, device, dtype)
    from bonsai.models.loading import load_model

    return load_model(args.model, dtype=dtype, device=str(device))


def skipped_params(model, adapter, full: dict, row: int) -> dict:
    """The weights of sub-model `row` with its dropped units physically gone: kept rows of q/k/v and the MLP
    inputs, kept columns of the output projections (index_select; LLaMA-style separate projections)."""
    names = {m: n for n, m in model.named_modules()}
    params = {}
    for key, mask in full.items():
        keep = torch.nonzero(mask[row]).flatten().to(next(model.parameters()).device)
        if key.kind == "attention":
            spec = adapter.attention(key.layer)
            q_rows = (keep[:, None] * spec.unit_width + torch.arange(spec.unit_width, device=keep.device)).flatten()
            kv_rows = (keep[:, None] * spec.head_dim + torch.arange(spec.head_dim, device=keep.device)).flatten()
            for lin, rows in ((spec.q, q_rows), (spec.k, kv_rows), (spec.v, kv_rows)):
                params[names[lin] + ".weight"] = lin.weight.index_select(0, rows)
            params[names[spec.out] + ".weight"] = spec.out.weight.index_select(1, q_rows)
        else:
            spec = adapter.mlp(key.layer)
            for lin in spec.inputs:
                params[names[lin] + ".weight"] = lin.weight.index_select(0, keep)
            params[names[spec.out] + ".weight"] = spec.out.weight.index_select(1, keep)
    return params


def cheaper_submodels(model, adapter, keys, windows, full, args, device, t_plain: float, per_sub: float) -> dict:
    """(a) shorter windows at equal tokens, (b) dropped units skipped instead of masked, (c) bf16 vs fp32,
    (d) probe sub-models started at their own block."""
    from torch.func import functional_call

    from bonsai.eval.perplexity import window_nll
    from bonsai.methods.bonsai.evaluate import SubModelEvaluator

    out = {}
    n_sub = len(next(iter(full.values())))
    # (a) the same tokens as 4x more windows of a quarter of the length
    short = windows.reshape(windows.shape[0] * 4, windows.shape[1] // 4)
    t_plain_short, _ = timed(lambda: window_nll(model, short, args.batch_size * 4), device)
    ev = SubModelEvaluator(model, adapter, keys, short, full, args.batch_size * 4)
    t_eval_short, _ = timed(lambda: ev.evaluate(list(range(n_sub))), device, repeats=1)
    out["short_windows"] = {"plain_forward_s": t_plain_short, "per_submodel_s": t_eval_short / n_sub,
                            "plain_ratio_to_long": t_plain_short / t_plain,
                            "submodel_ratio_to_long": (t_eval_short / n_sub) / per_sub,
                            "submodel_over_forward": (t_eval_short / n_sub) / t_plain}
    # (b) one sub-model alone: masked (rows of one sub-model per batch) vs its units physically skipped
    ev1 = SubModelEvaluator(model, adapter, keys, windows, full, args.batch_size)
    t_masked, (u_masked, _) = timed(lambda: ev1.evaluate([0]), device)

    def skipped():
        params = skipped_params(model, adapter, full, 0)
        nll, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(windows), args.batch_size):
                batch = windows[start:start + args.batch_size].to(device)
                logits = functional_call(model, params, (batch,)).logits[:, :-1].float()
                nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         batch[:, 1:].reshape(-1), reduction="sum").item()
                count += batch[:, 1:].numel()
        return -nll / count

    t_gather, _ = timed(lambda: skipped_params(model, adapter, full, 0), device)
    t_skipped, u_skipped = timed(skipped, device)
    out["skipped"] = {"masked_s": t_masked, "skipped_s": t_skipped, "gather_s": t_gather,
                      "skipped_over_masked": t_skipped / t_masked, "masked_over_forward": t_masked / t_plain,
                      "skipped_over_forward": t_skipped / t_plain,
                      "utility_masked": float(u_masked[0]), "utility_skipped": float(u_skipped),
                      "kept_share": float(np.mean([m[0].float().mean().item() for m in full.values()]))}
    # (d) the probe selection's sub-models (one group each): every forward from block 0, against each one
    #     started at its own block from the current model's kept states (`bonsai.engine.prefix`)
    probe_full = {k: torch.ones(len(keys), adapter.group_size(k), dtype=torch.uint8) for k in keys}
    for row, k in enumerate(keys):
        probe_full[k][row, : max(1, adapter.group_size(k) // 5)] = 0
    rows = list(range(len(keys)))
    times, utilities = {}, {}
    for name, reuse in (("from_block_0", False), ("from_own_block", True)):
        ev = SubModelEvaluator(model, adapter, keys, windows, probe_full, args.batch_size, reuse_prefix=reuse)
        times[name], (utilities[name], _) = timed(lambda ev=ev: ev.evaluate(rows), device, repeats=1)
    out["probes"] = {"probes": len(rows), **{f"{n}_s": t for n, t in times.items()},
                     "per_probe_over_forward": {n: t / len(rows) / t_plain for n, t in times.items()},
                     "own_block_over_block_0": times["from_own_block"] / times["from_block_0"],
                     "max_utility_difference": float(np.max(np.abs(utilities["from_own_block"]
                                                                   - utilities["from_block_0"])))}
    # (c) bf16 against fp32 for a plain forward (CPU only: on GPUs bf16 is the default)
    if device.type == "cpu":
        dtype = next(model.parameters()).dtype
        times = {}
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            model.to(dt)
            window_nll(model, windows[: args.batch_size], args.batch_size)
            times[name], _ = timed(lambda: window_nll(model, windows, args.batch_size), device)
        model.to(dtype)
        out["bf16_over_fp32"] = times["bfloat16"] / times["float32"]
        out["fp32_s"], out["bf16_s"] = times["float32"], times["bfloat16"]
    a, b = out["short_windows"], out["skipped"]
    print(f"(a) 4x shorter windows, same tokens: plain forward {a['plain_ratio_to_long']:.2f}x, sub-model "
          f"{a['submodel_ratio_to_long']:.2f}x the long-window times ({a['submodel_over_forward']:.2f}x a plain "
          f"long-window forward)")
    print(f"(b) one sub-model ({b['kept_share']:.1%} of units kept): masked {b['masked_over_forward']:.2f}x, skipped "
          f"{b['skipped_over_forward']:.2f}x a plain forward (gather {b['gather_s']:.3f} s); skipped / masked "
          f"{b['skipped_over_masked']:.2f}x; utilities {b['utility_masked']:.5f} vs {b['utility_skipped']:.5f}")
    if "bf16_over_fp32" in out:
        print(f"(c) bfloat16 / float32 plain forward on this CPU: {out['bf16_over_fp32']:.2f}x")
    d = out["probes"]
    print(f"(d) {d['probes']} probe sub-models (one group each): {d['per_probe_over_forward']['from_block_0']:.2f}x a "
          f"plain forward each from block 0, {d['per_probe_over_forward']['from_own_block']:.2f}x from their own "
          f"block: {d['own_block_over_block_0']:.2f}x the time (utilities differ by at most "
          f"{d['max_utility_difference']:.1e})")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--masks", type=int, default=6, help="sub-models timed")
    p.add_argument("--samples", type=int, default=200, help="sub-models per iteration, for the regression share")
    p.add_argument("--p-iter", type=float, default=0.05)
    p.add_argument("--speedup-sparsity", type=float, default=0.5)
    p.add_argument("--cheaper", action="store_true", help="also measure the three cheaper sub-model evaluations")
    p.add_argument("--json")
    args = p.parse_args()

    from bonsai.adapters import get_adapter
    from bonsai.eval.perplexity import window_nll
    from bonsai.methods.bonsai.evaluate import SubModelEvaluator, prior_pass
    from bonsai.methods.bonsai.regression import fit_unit_scores
    from bonsai.methods.bonsai.sampling import candidate_units, sample_masks
    from bonsai.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, torch.bfloat16 if args.shape else None)
    model = build(args, device, dtype)
    adapter = get_adapter(model)
    vocab = model.config.vocab_size
    windows = torch.randint(0, vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    res = {"device": str(device), "dtype": str(dtype), "seqlen": args.seqlen, "windows": args.windows,
           "batch_size": args.batch_size, "params": sum(p.numel() for p in model.parameters())}

    # 1. plain forward over the calibration tokens (the inference baseline)
    window_nll(model, windows[: args.batch_size], args.batch_size)  # warm-up
    peak_reset(device)
    t_plain, _ = timed(lambda: window_nll(model, windows, args.batch_size), device)
    mem_plain = peak(device)

    # 2. one iteration's prune steps: prior pass, sub-model evaluations, regression
    peak_reset(device)
    groups = adapter.groups()
    t_prior, (priors, _) = timed(lambda: prior_pass(model, adapter, groups, windows, "wanda", args.batch_size),
                                 device, repeats=1)
    cands = {k: candidate_units(priors[k], args.p_iter) for k in groups}
    keys = [k for k in groups if len(cands[k])]
    cand_priors = [priors[k][cands[k]] for k in keys]
    masks = sample_masks(cand_priors, args.masks, np.random.default_rng(0))
    offsets = np.cumsum([0] + [len(cands[k]) for k in keys])
    full = {}
    for j, k in enumerate(keys):
        m = torch.ones(len(masks), adapter.group_size(k), dtype=torch.uint8)
        m[:, torch.from_numpy(cands[k])] = torch.from_numpy(masks[:, offsets[j]:offsets[j + 1]])
        full[k] = m
    evaluator = SubModelEvaluator(model, adapter, keys, windows, full, args.batch_size)
    t_eval, (utility, _) = timed(lambda: evaluator.evaluate(list(range(len(masks)))), device, repeats=1)
    mem_prune = peak(device)
    per_sub = t_eval / len(masks)
    # regression at the real problem size: `samples` rows x all candidates
    n_cand = int(offsets[-1])
    rng = np.random.default_rng(0)
    X = sample_masks(cand_priors, args.samples, rng).astype(np.float64)
    y = X @ rng.normal(size=n_cand) * 1e-3 + rng.normal(size=args.samples) * 1e-3
    t0 = time.perf_counter()
    fit_unit_scores(X, y, "lasso")
    t_reg = time.perf_counter() - t0
    t_iter = t_prior + args.samples * per_sub + t_reg
    res.update({
        "plain_forward_s": t_plain, "prior_pass_s": t_prior, "per_submodel_s": per_sub,
        "submodel_over_forward": per_sub / t_plain, "regression_s": t_reg, "candidates": n_cand,
        "regression_share": t_reg / t_iter, "iteration_estimate_s": t_iter,
        "peak_mem_forward": mem_plain, "peak_mem_prune": mem_prune, "mem_ratio": mem_prune / mem_plain,
    })

    if args.cheaper:
        res["cheaper"] = cheaper_submodels(model, adapter, keys, windows, full, args, device, t_plain, per_sub)

    # 3. forward speedup of a model sliced to --speedup-sparsity (uniform per layer)
    for k in groups:
        n = adapter.group_size(k)
        adapter.slice(k, torch.arange(max(1, round(n * (1 - args.speedup_sparsity)))))
    window_nll(model, windows[: args.batch_size], args.batch_size)
    t_small, _ = timed(lambda: window_nll(model, windows, args.batch_size), device)
    res.update({"sliced_sparsity": args.speedup_sparsity, "sliced_forward_s": t_small,
                "speedup": t_plain / t_small, "sliced_params": sum(p.numel() for p in model.parameters())})

    gib = 2 ** 30
    print(f"device {device} dtype {dtype}  params {res['params'] / 1e6:.1f}M  tokens {args.windows}x{args.seqlen}  batch {args.batch_size}")
    print(f"plain forward over the calibration tokens : {t_plain:.3f} s, peak memory {mem_plain / gib:.2f} GiB")
    print(f"prior pass                                : {t_prior:.3f} s")
    print(f"one sub-model evaluation                  : {per_sub:.3f} s  = {per_sub / t_plain:.2f}x a plain forward")
    print(f"regression ({args.samples} x {n_cand} candidates, CV)   : {t_reg:.2f} s  = {100 * t_reg / t_iter:.1f}% of an iteration ({t_iter:.0f} s est.)")
    print(f"peak memory prune / plain forward         : {mem_prune / gib:.2f} / {mem_plain / gib:.2f} GiB = {mem_prune / mem_plain:.3f}x")
    print(f"forward speedup at {args.speedup_sparsity:.0%} uniform slicing      : {res['speedup']:.2f}x "
          f"({res['sliced_params'] / 1e6:.0f}M params)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
