"""report.png: units kept per layer (like the paper's Figure 4), and per iteration either each layer group's
probe cost (probe selection), the regression's CV tau (paper selection), or each iteration's convergence curve
(paper selection with --adaptive)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bonsai.engine.reconstruction import RemovalReport
from bonsai.io import write_json_atomic
from bonsai.methods.bonsai.state import RunState
from bonsai.progress import console


def plot_report(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = report["iterations"]
    last = history[-1]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    layers = range(len(last["attention_units"]))
    axes[0].bar(layers, last["attention_units"], color="tab:blue")
    axes[0].set_title("attention units kept per layer")
    axes[1].bar(layers, last["mlp_units"], color="tab:green")
    axes[1].set_title("MLP channels kept per layer")
    for ax in axes[:2]:
        ax.set_xlabel("layer")
    if any(h.get("probe_increase") for h in history):
        for h in history:
            costs = h.get("probe_increase") or {}
            for kind, marker in (("attention", "o"), ("mlp", "s")):
                xs = [int(k.split(".")[0]) for k in costs if k.endswith(kind)]
                ys = [v for k, v in costs.items() if k.endswith(kind)]
                axes[2].plot(xs, ys, marker=marker, linestyle="-", markersize=3, alpha=0.7,
                             label=f"iter {h['iteration']} {kind}")
        axes[2].set_yscale("log")
        axes[2].set_title("probe cost per layer group (KL or loss increase)")
        axes[2].set_xlabel("layer")
        axes[2].legend(fontsize=6, ncol=2)
    elif any(h.get("adaptive") for h in history):  # adaptive sampling: each iteration's convergence curve
        for h in history:
            curve = (h.get("adaptive") or {}).get("curve") or []
            xs = [c["sub_models"] for c in curve]
            axes[2].plot(xs, [c["cv_tau"] if c["cv_tau"] is not None else float("nan") for c in curve], marker="o",
                         markersize=3, label=f"iter {h['iteration']} tau")
            axes[2].plot(xs, [c["changed"] for c in curve], linestyle="--", alpha=0.6,
                         label=f"iter {h['iteration']} decision changed")
        axes[2].set_title("adaptive rounds: CV tau, share of decision changed")
        axes[2].set_xlabel("sub-models evaluated")
        axes[2].set_ylim(-0.1, 1.05)
        axes[2].legend(fontsize=6, ncol=2)
    else:
        taus = [h["cv_tau"] if h["cv_tau"] is not None else float("nan") for h in history]
        axes[2].plot([h["iteration"] for h in history], taus, marker="o")
        axes[2].set_title("cross-validated Kendall tau")
        axes[2].set_xlabel("iteration")
        axes[2].set_ylim(-0.1, 1.0)
    t = report["totals"]
    fig.suptitle(f"{report['model']}: {report['settings']['method']}, sparsity {t['sparsity']:.3f} "
                 f"(target {t['target_sparsity']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def emptied_groups(history: list[dict], initial: dict[str, int]) -> list[dict]:
    """Groups this run took to zero units, with the evidence: the group's measured probe cost in that iteration
    beside the median over all groups (a layer should lose everything only when removing it costs little)."""
    out, before = [], dict(initial)
    for rec in history:
        sizes = {f"{i}.attention": n for i, n in enumerate(rec["attention_units"])}
        sizes |= {f"{i}.mlp": n for i, n in enumerate(rec["mlp_units"])}
        probes = rec.get("probe_increase") or {}
        for group, n in sizes.items():
            if n == 0 and before.get(group, 0) > 0:
                entry = {"group": group, "iteration": rec["iteration"], "units_before": before[group]}
                if group in probes:
                    entry["probe_increase"] = probes[group]
                    entry["median_probe_increase"] = float(np.median(list(probes.values())))
                out.append(entry)
        before = sizes
    return out


class RunReport:
    """report.json and report.png of a run, and the finished model (a part of `PruneRun`)."""

    # ---- output ---------------------------------------------------------------------------
    def _report(self, state: RunState) -> dict:
        from bonsai.data import bos_record

        b = self.budget
        block_now = self.adapter.block_parameters()
        total_now = sum(p.numel() for p in self.model.parameters())
        return {
            "model": self.cfg.model,
            "settings": self.cfg.to_dict(),
            "seqlen": self.seqlen,
            "bos": bos_record(self.tokenizer, self.cfg.bos),
            "refit_windows": self._refit_windows,  # the refit's and the compensation statistics' windows
            "iterations": state.history,
            "totals": {
                "target_sparsity": self.cfg.sparsity,
                "sparsity": 1 - block_now / b.block_params,
                "fraction_of_all_params_removed": 1 - total_now / b.total_params,
                "target_reached": self._target_reached(),
                "block_params_before": b.block_params,
                "block_params_after": block_now,
                "params_before": b.total_params,
                "params_after": total_now,
                "max_unit_params": max(self.adapter.params_per_unit(k) for k in self.groups),
                "wall_seconds": state.elapsed_before,
                "peak_memory_bytes": self.peaks.peak(),
                "phase_peaks_exact": self.peaks.exact,  # False where the peak cannot be reset between phases
            },
            "kept_units": state.kept,
            "emptied_groups": emptied_groups(state.history, b.initial_units),
            "estimate": getattr(self, "_estimate", None),  # what the first line predicted (this process's start)
        }

    def _target_reached(self) -> bool:
        """Within one unit of the target (a group the refit emptied keeps a bias: a few parameters more)."""
        b = self.budget
        short = b.target_removed - (b.block_params - self.adapter.block_parameters())
        return short < min(self.adapter.params_per_unit(k) for k in self.groups)

    def _finish(self, state: RunState) -> dict:
        from bonsai.models.saving import save_pruned
        from bonsai.methods.bonsai.report import plot_report

        report = self._report(state)
        staging = self.store.dir
        write_json_atomic(staging / "report.json", report)
        extra = {"report.json": staging / "report.json", ".bonsai": staging}
        try:
            plot_report(report, staging / "report.png")
            extra["report.png"] = staging / "report.png"
        except Exception as exc:  # a plot must never lose a finished run
            console.print(f"[yellow]could not draw report.png: {exc}")
        save_pruned(self.model, self.tokenizer, self.out, overwrite=True, extra_files=extra)
        for name in ("report.json", "report.png"):
            (self.out / ".bonsai" / name).unlink(missing_ok=True)
        return report


def removal_summary(removal: RemovalReport) -> dict | None:
    """Mean relative output error of the changed layers, dropped vs refit (report.json)."""
    groups = removal.groups
    if not groups:
        return None
    return {
        "layers": len(groups),
        "mean_error_dropped": float(np.mean([g["error_dropped"] for g in groups.values()])),
        "mean_error_refit": float(np.mean([g["error_refit"] for g in groups.values()])),
        "added_biases": removal.added_biases,
        "warnings": removal.warnings,
    }


def finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
