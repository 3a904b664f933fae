"""`bonsai export`: a pruned (or any supported) model in a serving format (GGUF for llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import typer

from bonsai.cli.app import MODEL_HELP, app, quiet_transformers


@app.command("export")
def export_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    fmt: str = typer.Option("gguf", "--format", "-f", help="Output format: gguf (llama.cpp)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output file, e.g. model.gguf (written atomically)."),
    dtype: str = typer.Option("f16", help="Weight type: f32 | f16 | bf16 | q8_0 | q4_k_m | q5_k_m | q6_k (K-quants "
                                          "through llama.cpp's quantiser; norms and biases stay f32)."),
    allow_fallback: bool = typer.Option(False, "--allow-fallback",
                                        help="K-quants: write rows llama.cpp cannot block (widths not a multiple of "
                                             "256) in its fallback type instead of refusing."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the export report (layout, padding, types) here."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint (off by default)."),
) -> None:
    """Write a pruned (or any supported) model in a serving format: GGUF for llama.cpp."""
    quiet_transformers()
    from bonsai.export import export_model
    from bonsai.progress import out_console as console

    report = export_model(model, fmt, out, dtype, force=force, trust_remote_code=trust_remote_code,
                          allow_fallback=allow_fallback)
    console.print(f"wrote {out} ({report['architecture']}, {dtype}, {report['bytes'] / 2**20:.1f} MiB, "
                  f"{report['params_written']:,} values for {report['model_params']:,} parameters)")
    for note in report.get("padded", []):
        console.print(f"  padded: {note}")
    if report.get("removed_layers"):
        console.print(f"  removed layers (no attention, no MLP): {report['removed_layers']}")
    types: dict[str, int] = {}
    for t in report["tensor_types"].values():
        types[t] = types.get(t, 0) + 1
    console.print("  tensor types: " + ", ".join(f"{n} x {t}" for t, n in sorted(types.items())))
    fallback = report.get("k_quant_fallback") or sorted(
        n for n, t in report["tensor_types"].items() if t not in (dtype, "f32") and dtype in ("q8_0",))
    if fallback:
        console.print(f"  {len(fallback)} block matrices could not take {dtype} (row length), e.g. {fallback[0]}")
    if json_path is not None:
        from bonsai.io import write_json_atomic

        write_json_atomic(json_path, report)
