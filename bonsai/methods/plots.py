"""report.png for the unstructured baselines: sparsity per layer (uniform for Wanda, learned for BESA)."""

from __future__ import annotations

from pathlib import Path


def plot_layer_sparsity(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = report["layer_sparsity"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(values)), values, color="#4a7c59")
    ax.axhline(report["totals"]["target_sparsity"], color="k", ls="--", lw=1, label="target")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{report['model']}: {report['method']}, overall {report['totals']['sparsity']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
