"""`bonsai models` and `bonsai methods`: what bonsai can load and run."""

from __future__ import annotations



from bonsai.cli.app import app


@app.command("models")
def models_cmd() -> None:
    """List the model aliases and the supported architecture families."""
    from rich.table import Table

    from bonsai.adapters import supported_model_types
    from bonsai.models.aliases import MODEL_ALIASES
    from bonsai.progress import out_console as console

    table = Table(title="model aliases")
    table.add_column("alias")
    table.add_column("resolves to")
    for alias, target in MODEL_ALIASES.items():
        table.add_row(alias, target)
    console.print(table)
    console.print(f"supported families (config.model_type): {', '.join(supported_model_types())}")


@app.command("methods")
def methods_cmd() -> None:
    """List the pruning methods `bonsai prune --method` runs, and what each needs."""
    from rich.table import Table

    from bonsai.methods.registry import METHODS
    from bonsai.progress import out_console as console

    table = Table(title="pruning methods (bonsai prune --method NAME)")
    for column in ("method", "removes", "what it does"):
        table.add_column(column)
    for name, spec in METHODS.items():
        table.add_row(name, "units (heads, channels)" if spec.structured else "weights (zeroed)", spec.summary)
    console.print(table)
