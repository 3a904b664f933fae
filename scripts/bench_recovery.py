#!/usr/bin/env python
"""Recovery on a real model (issue 41, part 3): a pruned model finetuned with LoRA + distillation from the cached
parent logits, measured side by side with its parent and the pruned model it started from.

    python scripts/bench_recovery.py --parent runs/models/smollm2-135m \
        --pruned runs/quality/runs/smollm2/bonsai/lstsq/s0.5-seed0 --data austen --steps 400 --out runs/recovery

Every step is its own process (`bonsai finetune`, `bonsai eval`, `bonsai export`), so no step's memory counts in
another's. Printed: held-out perplexity (the same windows as `scripts/quality_matrix.py`: Austen's held-out
chapters, 256-token windows) and cloze accuracy of the parent, the pruned and the finetuned model; the share of
the pruned model's perplexity gap to its parent that finetuning recovered; the finetune's wall time, peak memory
and teacher-cache size; and the merged model exported to GGUF (f16) and evaluated in llama.cpp on the same
windows, against the same model in transformers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL = ["--seqlen", "256", "--max-windows", "64", "--batch-size", "8"]
TASK = "austen_cloze"


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{done.stderr[-3000:]}")


def evaluate(model: str, out: Path, text: str, tasks: bool = True) -> dict:
    """Held-out perplexity (and the cloze accuracy) of a model folder or GGUF file, cached in `out`."""
    if not out.exists():
        targets = text + (f",{TASK}" if tasks else "")
        cmd = [sys.executable, "-m", "bonsai", "eval", targets, "--model", model, *EVAL, "--json", str(out)]
        if tasks:
            cmd += ["--include-path", str(ROOT / "tests" / "tasks")]
        run(cmd)
    result = json.loads(out.read_text())
    ppl = result["perplexity"][text]["ppl"] if "perplexity" in result else result["ppl"]
    acc = result.get("tasks", {}).get(TASK, {}).get("acc")
    return {"ppl": ppl, "acc": acc}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parent", required=True)
    p.add_argument("--pruned", required=True, help="a `bonsai prune` output folder")
    p.add_argument("--data", default="austen", help="finetuning text (its train split) and held-out text")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--extra", default="", help="more `bonsai finetune` flags")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tuned = out / "finetuned"
    if not (tuned / "report.json").exists():
        run([sys.executable, "-m", "bonsai", "finetune", "--model", args.pruned, "--teacher", args.parent,
             "--data", args.data, "--seqlen", str(args.seqlen), "--steps", str(args.steps),
             "--samples", str(args.steps), "--out", str(tuned), *args.extra.split()])
    ft = json.loads((tuned / "report.json").read_text())
    gguf = out / "finetuned-f16.gguf"
    if not gguf.exists():
        run([sys.executable, "-m", "bonsai", "export", str(tuned), "--out", str(gguf), "--dtype", "f16"])
    rows = {"parent": evaluate(args.parent, out / "eval-parent.json", args.data),
            "pruned": evaluate(args.pruned, out / "eval-pruned.json", args.data),
            "finetuned": evaluate(str(tuned), out / "eval-finetuned.json", args.data),
            "finetuned, GGUF f16 in llama.cpp": evaluate(str(gguf), out / "eval-gguf.json", args.data, tasks=False)}
    parent, pruned, after = rows["parent"]["ppl"], rows["pruned"]["ppl"], rows["finetuned"]["ppl"]
    recovered = (pruned - after) / (pruned - parent) if pruned > parent else float("nan")
    print(f"| model | held-out ppl ({args.data}) | x parent | cloze acc |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        acc = "-" if r["acc"] is None else f"{r['acc']:.3f}"
        print(f"| {name} | {r['ppl']:.2f} | {r['ppl'] / parent:.2f} | {acc} |")
    cache = ft.get("teacher_cache") or {}
    summary = {"gap_recovered": recovered, "finetune_wall_seconds": ft.get("wall_seconds"),
               "finetune_peak_memory_mib": (ft.get("peak_memory_bytes") or 0) / 2**20,
               "teacher_cache_mib": (cache.get("bytes") or 0) / 2**20, "steps": args.steps, "seqlen": args.seqlen,
               "gguf_vs_transformers_ppl": rows["finetuned, GGUF f16 in llama.cpp"]["ppl"] / after,
               "gguf_mib": gguf.stat().st_size / 2**20}
    print(json.dumps(summary, indent=1))
    (out / "summary.json").write_text(json.dumps({"rows": rows, **summary}, indent=1))


if __name__ == "__main__":
    main()
