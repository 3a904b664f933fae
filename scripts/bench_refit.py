#!/usr/bin/env python
"""The refit's statistics passes, stopped early against run through, side by side in one run.

The lstsq refit (`bonsai/engine/reconstruction.py`) visits the blocks in order; per block it needs the Gram matrix of
the attention's output projection (on the block's input), then that of the MLP's (after the attention's
refit), then the block's output for the next block. The two statistics passes used to run the whole block;
they now stop each batch once their projection has its input (`block_statistics`), so the attention pass
skips the MLP. This script times, per block and on the same batches, the three passes both ways (Gram
hooks included, as the refit runs them) and prints the refit's forward time before / after.

  python scripts/bench_refit.py --shape smollm2-135m --windows 64 --seqlen 128 --batch-size 8
  python scripts/bench_refit.py --shape llama-2-7b --device cuda --dtype bfloat16 --windows 8 --seqlen 2048 --batch-size 1

`--compare-targets` times instead the whole refit (`remove_units`, every group losing a third of its units) with
each `--refit-target`, own and residual, on copies of the same model and windows, and prints their ratio.
  python scripts/bench_refit.py --shape smollm2-135m --windows 64 --seqlen 128 --compare-targets
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a clone without installing
from bench_prune import SHAPES, build, sync  # noqa: E402

from bonsai.runtime import configure_threads  # noqa: E402

configure_threads()


def timed(device, fn, *args):
    """(seconds, result) of fn(*args), synchronised on accelerators."""
    sync(device)
    start = time.perf_counter()
    result = fn(*args)
    sync(device)
    return time.perf_counter() - start, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--model", help="a model folder instead of --shape")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--blocks", type=int, default=4, help="blocks timed (the first ones; each is alike)")
    p.add_argument("--compare-targets", action="store_true", help="time the whole refit, own against residual target")
    p.add_argument("--json")
    args = p.parse_args()
    if args.compare_targets:
        compare_targets(args)
        return

    from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
    from bonsai.engine.blocks import block_outputs, block_statistics, capture_block_inputs
    from bonsai.engine.spill import states_store
    from bonsai.engine.statistics import GramStats
    from bonsai.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, torch.bfloat16)
    model = build(argparse.Namespace(shape=None if args.model else args.shape, model=args.model), device, dtype)
    adapter = get_adapter(model)
    vocab = model.config.vocab_size
    windows = torch.randint(0, vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(model, adapter.layers(), windows, args.batch_size,
                                  states_store(model, windows.numel()))
    rows = []
    for i in range(min(args.blocks, len(adapter.layers()))):
        block = adapter.layers()[i]
        stages = ([[GroupKey(i, ATTENTION), GroupKey(i, MLP)]] if adapter.parallel_block
                  else [[GroupKey(i, ATTENTION)], [GroupKey(i, MLP)]])
        full = early = 0.0
        for stage in stages:
            projections = {k: adapter.output_projection(k) for k in stage}
            with GramStats(projections):
                full += timed(device, block_outputs, block, inputs)[0]
            with GramStats(projections):
                early += timed(device, block_statistics, block, inputs, list(projections.values()))[0]
        out_pass, outputs = timed(device, block_outputs, block, inputs)  # the same both ways
        rows.append(dict(block=i, before=full + out_pass, after=early + out_pass))
        print(f"block {i}: statistics passes {full:.2f} s run through, {early:.2f} s stopped early; "
              f"output pass {out_pass:.2f} s")
        inputs.hidden = outputs  # the timed pass's outputs feed the next block
    before, after = sum(r["before"] for r in rows), sum(r["after"] for r in rows)
    print(f"refit forward time over {len(rows)} blocks ({args.windows} x {args.seqlen} tokens, {device}, {dtype}): "
          f"{before:.2f} s before, {after:.2f} s after = {after / before:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), blocks=rows, ratio=after / before), indent=1))


def compare_targets(args) -> None:
    """The whole refit of one removal with each target, on copies of one model, side by side."""
    import copy

    from bonsai.adapters import get_adapter
    from bonsai.engine.reconstruction import remove_units
    from bonsai.engine.refit import REFIT_TARGETS
    from bonsai.runtime import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, torch.bfloat16)
    parent = build(argparse.Namespace(shape=None if args.model else args.shape, model=args.model), device, dtype)
    windows = torch.randint(0, parent.config.vocab_size, (args.windows, args.seqlen),
                            generator=torch.Generator().manual_seed(0))
    seconds = {}
    for target in REFIT_TARGETS:
        model = copy.deepcopy(parent)
        adapter = get_adapter(model)
        keep = {k: torch.arange(adapter.group_size(k) // 3, adapter.group_size(k)) for k in adapter.groups()}
        seconds[target] = timed(device, remove_units, model, adapter, keep, windows, "lstsq", 0.01, args.batch_size,
                                None, None, None, target)[0]
        print(f"refit, {target} target: {seconds[target]:.2f} s")
        del model
    ratio = seconds["residual"] / seconds["own"]
    print(f"whole refit ({args.windows} x {args.seqlen} tokens, {device}, {dtype}): residual / own = {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), seconds=seconds, ratio=ratio), indent=1))


if __name__ == "__main__":
    main()
