"""report.png: units kept per layer (like the paper's Figure 4), and per iteration either each layer group's
probe cost (probe selection), the regression's CV tau (paper selection), or each iteration's convergence curve
(paper selection with --adaptive)."""

from __future__ import annotations

from pathlib import Path


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
