"""Peak memory of pruning against a plain forward with the same batch: the "inference memory only" claim.

Each measurement runs in its own process (so CPU peak RSS is not shared between them): a plain forward,
the Bonsai prune steps of the paper (prior pass with hooks + sub-model evaluations with masks), the probe
steps (Gram statistics block by block over the refit windows, candidates' inverse columns, compensated probe
sub-models), the reconstruction (half of every group removed and refit block by block, lstsq, over the refit
windows a prune run's defaults give: 16 tokens per column of the widest output projection, `--refit-windows`
to change), and LLM-Pruner's gradient importance (backward passes). Prints the ratios side by side; RSS on CPU, max allocated on GPU.

    python scripts/bench_memory.py --model tiny --seqlen 128 --batch-size 8
    python scripts/bench_memory.py --shape llama-2-7b --device cuda --dtype bfloat16 --seqlen 2048 --batch-size 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("forward", "bonsai", "probe", "reconstruct", "llm-pruner")


def child(args) -> None:
    import torch
    from bench_prune import build, peak, peak_reset

    from bonsai.adapters import get_adapter
    from bonsai.runtime import DTYPES, resolve_device

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    model = build(args, device, dtype)
    adapter = get_adapter(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    windows = torch.randint(0, vocab, (args.batch_size, args.seqlen), generator=torch.Generator().manual_seed(0))
    groups = adapter.groups()
    from bonsai.reconstruct import refit_windows, widest_projection

    # the unit errors and the refit run over the refit windows, as a prune run's defaults give them
    n_refit = args.refit_windows or refit_windows(None, 32, widest_projection(adapter, groups), args.seqlen)
    refit = torch.randint(0, vocab, (n_refit, args.seqlen), generator=torch.Generator().manual_seed(1))
    peak_reset(device)
    if args.child == "forward":
        with torch.no_grad():
            model(windows.to(device), use_cache=False)
    elif args.child == "bonsai":
        import numpy as np

        from bonsai.prune.evaluate import SubModelEvaluator, prior_pass

        prior_pass(model, adapter, groups, windows, "wanda", args.batch_size)
        masks = {k: torch.from_numpy(np.random.default_rng(0).integers(0, 2, (args.batch_size, adapter.group_size(k)))
                                     .astype(np.uint8)) for k in groups}
        SubModelEvaluator(model, adapter, groups, windows, masks, args.batch_size).evaluate(list(range(args.batch_size)))
    elif args.child == "probe":
        import numpy as np

        from bonsai.prune.compensation import group_statistics
        from bonsai.prune.evaluate import SubModelEvaluator
        from bonsai.prune.sampling import candidate_units, probe_masks

        cands = {}

        def columns(key, errors):  # only the candidates' columns of H^-1 are kept, as in the runner
            cands[key] = torch.from_numpy(candidate_units(errors.numpy(), 0.05))
            w = adapter.unit_width(key)
            return (cands[key][:, None] * w + torch.arange(w)).reshape(-1)

        stats, comp = group_statistics(model, adapter, groups, refit, args.batch_size, keep_inverse=True,
                                       columns=columns)
        masks = probe_masks([stats[k].unit_error.numpy()[cands[k].numpy()] for k in groups], 1)[:args.batch_size]
        offsets = np.cumsum([0] + [len(cands[k]) for k in groups])
        full = {}
        for j, k in enumerate(groups):
            m = torch.ones(len(masks), adapter.group_size(k), dtype=torch.uint8)
            m[:, cands[k]] = torch.from_numpy(masks[:, offsets[j]:offsets[j + 1]])
            full[k] = m
        SubModelEvaluator(model, adapter, groups, windows, full, args.batch_size, compensation=comp,
                          candidates=cands).evaluate(list(range(len(masks))))
    elif args.child == "reconstruct":
        from bonsai.reconstruct import remove_units

        keep = {k: torch.arange(0, adapter.group_size(k), 2) for k in groups}
        remove_units(model, adapter, keep, refit, "lstsq", batch_size=args.batch_size)
    else:
        from bonsai.baselines.llm_pruner import group_importance

        group_importance(model, adapter, groups, windows, args.batch_size, "element1", "sum")
    print(json.dumps({"mode": args.child, "peak_bytes": int(peak(device)), "device": str(device),
                      "refit_windows": n_refit}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--shape", default=None, help="random weights of this shape (see bench_prune.py) instead of --model")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--refit-windows", type=int, default=0,
                   help="windows of the unit errors and the refit (default: a prune run's, 16 tokens per column)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.child:
        return child(args)
    peaks = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--device", args.device, "--dtype",
               args.dtype, "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
               "--refit-windows", str(args.refit_windows)]
        if args.shape:
            cmd += ["--shape", args.shape]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[mode] = json.loads(out)["peak_bytes"]
        n_refit = json.loads(out)["refit_windows"]
    kind = "max allocated (GPU)" if "cuda" in args.device or (args.device == "auto" and _cuda()) else "peak RSS (CPU)"
    print(f"{args.shape or args.model}, batch {args.batch_size} x {args.seqlen} tokens, {n_refit} refit windows, "
          f"{kind}:")
    for mode in MODES:
        print(f"  {mode:11s} {peaks[mode] / 2**20:10.1f} MiB   {peaks[mode] / peaks['forward']:.3f}x plain forward")
    if args.json:
        args.json.write_text(json.dumps({"peaks": peaks, "refit_windows": n_refit, "ratios": {m: peaks[m] / peaks["forward"] for m in MODES},
                                         "settings": vars(args)}, indent=2, default=str))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
