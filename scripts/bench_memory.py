#!/usr/bin/env python
"""Peak memory of whole `bonsai prune` runs against a plain forward with the same batch: the "memory of
inference" promise, measured side by side in one run, with the cost model's prediction beside each.

Each command runs in its own process: a plain forward of one batch (`--batch-size` x `--seqlen`) of the model as
`bonsai` loads it, then `bonsai prune` with each method (`--methods`) on the same model, calibration text and
settings. On a CPU the peak is the process's resident memory sampled from /proc (`rss_watch.py`); on a GPU, the
maximum allocated that the run reports. For bonsai's runs the report's per-phase peaks say where it went, and
the prediction is the estimate the run printed first (`--dry-run` prints the same).

    python scripts/bench_memory.py --shape gemma-3-270m --calib austen --calib-samples 8 --seqlen 128
    python scripts/bench_memory.py --model runs/models/smollm2-135m --calib austen --calib-samples 8 --seqlen 128
    python scripts/bench_memory.py --shape llama-3-8b-2l --reconstruct-samples 64 --methods bonsai,flap
    python scripts/bench_memory.py --shape llama-2-7b --device cuda --dtype bfloat16 --seqlen 2048 --batch-size 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

METHODS = {  # name -> prune flags
    "bonsai": [],
    "bonsai-paper": ["--selection", "paper", "--samples", "16", "--p-iter", "0.15"],
    "flap": ["--method", "flap"],
    "llm-pruner": ["--method", "llm-pruner"],
    "wanda": ["--method", "wanda", "--sparsity-type", "unstructured"],
}


def forward_child(args) -> None:
    """One plain forward of a batch, as inference runs it; prints its peak."""
    import torch

    from bonsai.models.loading import load_model
    from bonsai.runtime import peak_memory, resolve_device

    device = resolve_device(args.device)
    model = load_model(args.model, dtype=args.dtype, device=str(device))
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = torch.randint(0, min(vocab, 32000), (args.batch_size, args.seqlen), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        model(batch.to(device), use_cache=False)
    print(json.dumps({"peak_bytes": peak_memory(device)}))


def measured(cmd: list[str], env: dict) -> tuple[int, float, str]:
    """(peak resident bytes of the command's processes, seconds, its stderr and stdout)."""
    from rss_watch import tree_rss

    start = time.time()
    with tempfile.TemporaryFile("w+") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        peak = 0
        while child.poll() is None:
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.01)
        log.seek(0)
        text = log.read()
    if child.returncode != 0:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    return peak, time.time() - start, text


def predicted(log: str) -> tuple[float | None, float | None]:
    """The run's first-line estimate: (peak GiB, seconds)."""
    text = " ".join(log.split())
    mem = re.search(r"peak memory ~([\d.]+) GiB", text)
    t = re.search(r"~(?:at most )?([\d.]+) (s|min|h) on this device", text)
    seconds = None if t is None else float(t.group(1)) * {"s": 1, "min": 60, "h": 3600}[t.group(2)]
    return (float(mem.group(1)) if mem else None), seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model folder (default: the --shape built with random weights)")
    p.add_argument("--shape", help="a real family's shape with random weights (scripts/shapes.py), saved under runs/shapes")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--calib", default="austen")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--reconstruct-samples", type=int, default=None, help="refit windows (default: the prune default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--extra", default="", help="more prune flags for every method")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=["forward"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return forward_child(args)
    if args.model is None:
        if not args.shape:
            raise SystemExit("give --model or --shape")
        from shapes import save_shape

        args.model = str(ROOT / "runs" / "shapes" / args.shape)
        if not (Path(args.model) / "config.json").exists():
            save_shape(args.shape, Path(args.model))
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    gpu = args.device.startswith("cuda") or (args.device == "auto" and _cuda())
    common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--seqlen", str(args.seqlen),
              "--batch-size", str(args.batch_size)]
    peak, _, out = measured([sys.executable, __file__, "--child", "forward", *common], env)
    forward = json.loads(out.strip().splitlines()[-1])["peak_bytes"] if gpu else peak
    rows = {"forward": {"peak_bytes": forward}}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for method in args.methods.split(","):
            cmd = [sys.executable, "-m", "bonsai", "prune", *common, "--sparsity", str(args.sparsity), "--calib", args.calib,
                   "--calib-samples", str(args.calib_samples), "--out", f"{tmp}/{method}", *METHODS[method],
                   *args.extra.split()]
            if args.reconstruct_samples and method not in ("wanda",):
                cmd += ["--reconstruct-samples", str(args.reconstruct_samples)]
            peak, seconds, log = measured(cmd, env)
            report = json.loads(Path(f"{tmp}/{method}/report.json").read_text())
            totals = report["totals"]
            row = {"peak_bytes": totals["peak_memory_bytes"] if gpu else peak, "reported_peak_bytes": totals["peak_memory_bytes"],
                   "wall_seconds": totals["wall_seconds"], "process_seconds": seconds, "sparsity": totals["sparsity"]}
            if report.get("iterations"):
                gib, secs = predicted(log)
                row["predicted_peak_bytes"] = None if gib is None else gib * 2**30
                row["predicted_seconds"] = secs
                row["phase_peak_bytes"] = {k: max(it.get("phase_peak_bytes", {}).get(k, 0) for it in report["iterations"])
                                           for k in report["iterations"][0].get("phase_peak_bytes", {})}
                row["phase_seconds"] = {k: sum(it["phase_seconds"].get(k, 0) for it in report["iterations"])
                                        for k in report["iterations"][0]["phase_seconds"]}
            rows[method] = row
            print(f"{method}: {row['peak_bytes'] / 2**20:.0f} MiB in {seconds:.0f} s", flush=True)
    kind = "max allocated (GPU)" if gpu else "peak RSS (CPU)"
    print(f"\n{args.shape or args.model}, batch {args.batch_size} x {args.seqlen}, {args.calib_samples} calibration windows, "
          f"{kind}:")
    for name, row in rows.items():
        line = f"  {name:13s} {row['peak_bytes'] / 2**20:9.0f} MiB  {row['peak_bytes'] / forward:6.3f}x plain forward"
        if row.get("predicted_peak_bytes"):
            line += f"   predicted {row['predicted_peak_bytes'] / row['peak_bytes']:.2f}x of it"
        if row.get("predicted_seconds"):
            line += f", time predicted {row['predicted_seconds'] / row['wall_seconds']:.2f}x of {row['wall_seconds']:.0f} s"
        print(line)
        if row.get("phase_peak_bytes"):
            print("                " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in row["phase_peak_bytes"].items())
                  + " MiB; " + ", ".join(f"{k} {v:.0f}" for k, v in row["phase_seconds"].items()) + " s")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "ratios": {m: r["peak_bytes"] / forward for m, r in rows.items()}}, indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
