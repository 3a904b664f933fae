"""Regenerate the paper's tables and figures at a chosen scale: a markdown table and a PNG each.

    python scripts/paper_tables.py --scale tiny --out docs/paper            # shipped model, CPU, ~15 min
    python scripts/paper_tables.py --scale full --out results/paper --tables table2,fig2   # LLaMA-2-7B, GPU

Tables: table2 (parent vs Wanda 2:4 vs Bonsai: ppl and speedup), table5 (number of sub-models),
table7 (p_iter), fig2 (prior-only / no-regression / Bonsai), fig3 (prior choice). Pruned models are
cached under OUT/runs/ by their settings, so shared runs (the default Bonsai run) happen once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The paper's algorithm as published (random unit masks, Lasso, LM-loss utility, no refit), so that its figures
# are reproduced; bonsai's defaults differ (docs/quality.md).
PAPER = dict(selection="paper", prior="wanda", compensate=False, utility="loss", reconstruct="none", adaptive=False)
SCALES = {
    "tiny": dict(prune=dict(model="tiny", calib="kjv", sparsity=0.5, p_iter=0.1, samples=64, calib_samples=16,
                            seqlen=128, batch_size=16, **PAPER),
                 eval=dict(target="kjv", seqlen=512), samples=[16, 32, 64], p_iters=[0.05, 0.1, 0.25],
                 bench=dict(seqlen=512, batch_sizes=[1, 8], generate_tokens=32, repeats=5)),
    "full": dict(prune=dict(model="llama-2-7b", calib="wikitext2", sparsity=0.5, p_iter=0.05, samples=200,
                            calib_samples=32, batch_size=8, **PAPER),
                 eval=dict(target="wikitext2", seqlen=4096), samples=[50, 100, 200], p_iters=[0.05, 0.1, 0.2],
                 bench=dict(seqlen=2048, batch_sizes=[1, 8], generate_tokens=128, repeats=10)),
}
TABLES = ("table2", "table5", "table7", "fig2", "fig3")


class Runner:
    def __init__(self, scale: str, out: Path):
        self.scale, self.s, self.out = scale, SCALES[scale], out
        (out / "runs").mkdir(parents=True, exist_ok=True)
        self.log: list[str] = []

    def pruned(self, **overrides) -> tuple[Path, dict]:
        from bonsai.methods.registry import get_method
        from bonsai.methods.settings import PruneConfig

        settings = {**self.s["prune"], **overrides}
        if not get_method(settings.get("method", "bonsai")).searches:  # baselines: their own settings
            settings = {k: v for k, v in settings.items() if k not in PAPER}
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
        path = self.out / "runs" / f"{settings['method'] if 'method' in settings else 'bonsai'}-{key}"
        if not (path / "report.json").exists():
            cfg = PruneConfig(**settings).validate()
            # a folder without its report.json (a run that stopped) is replaced
            cfg.spec.load_runner()(cfg, path, force=not cfg.spec.searches or path.exists()).run()
            self.log.append(f"pruned {path.name}: {json.dumps(settings)}")
        return path, json.loads((path / "report.json").read_text())

    def ppl(self, model: str) -> float:
        from bonsai.eval.runner import run_perplexity

        return run_perplexity(self.s["eval"]["target"], model, seqlen=self.s["eval"]["seqlen"])["ppl"]


def write(out: Path, name: str, title: str, header: list[str], rows: list[list], note: str, plot) -> None:
    lines = [f"## {title}", "", note, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    plot(ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    print("\n".join(lines) + "\n", flush=True)


def note_for(r: Runner) -> str:
    p = r.s["prune"]
    return (f"Scale `{r.scale}`: {p['model']} pruned to {p['sparsity']:.0%} on `{p['calib']}` "
            f"(p_iter {p['p_iter']}, {p['samples']} sub-models, {p['calib_samples']} x {p.get('seqlen') or 2048} "
            f"calibration tokens unless varied); perplexity on `{r.s['eval']['target']}` test, seqlen "
            f"{r.s['eval']['seqlen']}; no finetuning." + (" **Tiny-model results, not the paper's LLaMA-2-7B.**"
                                                           if r.scale == "tiny" else ""))


def table2(r: Runner) -> None:
    from bonsai.bench.speed import run_bench

    parent = r.s["prune"]["model"]
    bonsai_path, _ = r.pruned()
    wanda_path, _ = r.pruned(method="wanda", sparsity_type="2:4", calib_samples=max(r.s["prune"]["calib_samples"], 16))
    b = r.s["bench"]
    rows = [[parent, "-", f"{r.ppl(parent):.2f}", "1.00x"]]
    for label, path, sparse in (("Wanda 2:4", wanda_path, True), ("Bonsai", bonsai_path, False)):
        bench = run_bench(str(path), parent, b["seqlen"], b["batch_sizes"][:1], 0, b["repeats"], "auto", "auto",
                          sparse_kernels=sparse)
        rows.append([label, "structured" if label == "Bonsai" else "2:4", f"{r.ppl(str(path)):.2f}",
                     f"{bench['speedup']['forward_b1']:.2f}x" + (f" ({bench['notes'][0]})" if bench["notes"] else "")])
    ppl = [float(x[2]) for x in rows]
    write(r.out, "table2", "Table 2: parent vs Wanda 2:4 vs Bonsai (50%)", ["model", "sparsity", "ppl", "speedup (b=1)"],
          rows, note_for(r), lambda ax: (ax.bar([x[0] for x in rows], ppl, color="#4a7c59"), ax.set_ylabel("ppl")))


def table5(r: Runner) -> None:
    rows = []
    for n in r.s["samples"]:
        path, rep = r.pruned(samples=n)
        rows.append([n, f"{r.ppl(str(path)):.2f}", f"{rep['totals']['wall_seconds']:.0f}"])
    write(r.out, "table5", "Table 5: number of sub-models per iteration", ["sub-models", "ppl", "prune seconds"], rows,
          note_for(r), lambda ax: (ax.plot([x[0] for x in rows], [float(x[1]) for x in rows], "o-"),
                                   ax.set_xlabel("sub-models"), ax.set_ylabel("ppl")))


def table7(r: Runner) -> None:
    rows = []
    for p in r.s["p_iters"]:
        path, rep = r.pruned(p_iter=p)
        rows.append([p, len(rep["iterations"]), f"{r.ppl(str(path)):.2f}", f"{rep['totals']['wall_seconds']:.0f}"])
    write(r.out, "table7", "Table 7: fraction pruned per iteration (p_iter)", ["p_iter", "iterations", "ppl",
                                                                               "prune seconds"], rows, note_for(r),
          lambda ax: (ax.plot([x[0] for x in rows], [float(x[2]) for x in rows], "o-"), ax.set_xlabel("p_iter"),
                      ax.set_ylabel("ppl")))


def _ablation(r: Runner, name: str, title: str, setting: str, values: tuple[str, ...], default: str) -> None:
    """One pruned model per value of `setting` (the default value is the shared Bonsai run), as a bar chart."""
    rows = []
    for value in values:
        path, _ = r.pruned(**({} if value == default else {setting: value}))
        rows.append([value, f"{r.ppl(str(path)):.2f}"])
    write(r.out, name, title, [setting, "ppl"], rows, note_for(r),
          lambda ax: (ax.bar([x[0] for x in rows], [float(x[1]) for x in rows], color="#4a7c59"), ax.set_ylabel("ppl")))


def fig2(r: Runner) -> None:
    _ablation(r, "fig2", "Figure 2: perturbation and regression ablations", "method",
              ("prior-only", "no-regression", "random", "bonsai"), "bonsai")


def fig3(r: Runner) -> None:
    _ablation(r, "fig3", "Figure 3: choice of prior", "prior", ("uniform", "magnitude", "activation", "wanda"), "wanda")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=list(SCALES), default="tiny")
    ap.add_argument("--out", type=Path, default=Path("docs/paper"))
    ap.add_argument("--tables", default=",".join(TABLES), help=f"comma-separated subset of {', '.join(TABLES)}")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    r = Runner(args.scale, args.out)
    start = time.time()
    for name in args.tables.split(","):
        globals()[name.strip()](r)
    print(f"done in {time.time() - start:.0f}s; runs cached in {args.out / 'runs'}")


if __name__ == "__main__":
    main()
