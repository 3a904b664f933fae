"""The `bonsai` command line."""

from __future__ import annotations

import sys
from pathlib import Path

from bonsai.runtime import configure_threads

configure_threads()  # before torch is imported anywhere

import typer

from bonsai.errors import BonsaiError

app = typer.Typer(
    help="Structured pruning of LLMs with forward passes only (Bonsai). Run `bonsai COMMAND --help`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

MODEL_HELP = "Model folder, Hugging Face id, or alias (see `bonsai models`; `tiny` is the shipped model)."


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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


@app.command("eval")
def eval_cmd(
    target: str = typer.Argument(..., help="wikitext2, c4, kjv (the shipped corpus; alias tiny) or a local .txt/.jsonl file."),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    seqlen: int | None = typer.Option(None, help="Window length; default 2048 capped at the model's max positions."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Windows per forward pass."),
    split: str = typer.Option("test", help="Split of a hub dataset: test, validation or train."),
    max_windows: int | None = typer.Option(None, min=1, help="Evaluate only the first N windows."),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16 (auto: float32 on CPU, checkpoint dtype on GPU)."),
    device: str = typer.Option("auto", help="auto|cpu|cuda|cuda:N"),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint (off by default)."),
) -> None:
    """Perplexity over non-overlapping windows (Wanda/SparseGPT protocol, remainder dropped)."""
    _quiet_transformers()
    from bonsai.eval.runner import run_perplexity

    result = run_perplexity(target, model, seqlen=seqlen, batch_size=batch_size, split=split,
                            max_windows=max_windows, dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code)
    _print_ppl(result)
    if json_path is not None:
        from bonsai.io import write_json_atomic

        write_json_atomic(json_path, result)


@app.command("prune")
def prune_cmd(
    model: str | None = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    sparsity: float | None = typer.Option(None, help="Fraction of transformer-block parameters to remove, in (0,1)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (pruned model, report.json, report.png, state)."),
    config: str | None = typer.Option(None, help="YAML preset: a path or a name under configs/ (e.g. llama-2-7b)."),
    method: str | None = typer.Option(None, help="bonsai | prior-only | no-regression | random (paper Fig. 2)."),
    prior: str | None = typer.Option(None, help="wanda | activation | magnitude | uniform (paper Fig. 3)."),
    p_iter: float | None = typer.Option(None, "--p-iter", help="Fraction pruned per iteration (default 0.05)."),
    samples: int | None = typer.Option(None, help="Sub-models evaluated per iteration (default 200)."),
    calib: str | None = typer.Option(None, help="Calibration data: wikitext2, c4, kjv or a local file."),
    calib_samples: int | None = typer.Option(None, "--calib-samples", help="Calibration windows (default 32)."),
    seqlen: int | None = typer.Option(None, help="Calibration window length (default 2048 capped at max positions)."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Rows per forward pass (rows may mix sub-models)."),
    regression: str | None = typer.Option(None, help="lasso (L1, default) | ridge (L2)."),
    units: str | None = typer.Option(None, help="Unit kinds to prune: attention,mlp (default), attention or mlp."),
    seed: int | None = typer.Option(None, help="Random seed (same seed, same model)."),
    dtype: str | None = typer.Option(None, help="auto|float32|bfloat16|float16."),
    device: str | None = typer.Option(None, help="auto|cpu|cuda|cuda:N."),
    device_map: str | None = typer.Option(None, "--device-map",
                                          help="accelerate placement (e.g. auto) for models larger than one device."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Save state every N sub-models (default 10)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    processes: int = typer.Option(1, "--processes", min=1,
                                  help="Processes sharing the sub-model evaluations (one replica each; a GPU each "
                                       "when GPUs are used). Same as `accelerate launch --num_processes N -m bonsai prune`."),
) -> None:
    """Prune a model with Bonsai to the target sparsity; rerun the same command to resume."""
    import os

    if processes > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(processes)
    _quiet_transformers()
    from bonsai.prune.config import build_config
    from bonsai.prune.runner import PruneRun

    overrides = dict(model=model, sparsity=sparsity, method=method, prior=prior, p_iter=p_iter, samples=samples,
                     calib=calib, calib_samples=calib_samples, seqlen=seqlen, batch_size=batch_size,
                     regression=regression, units=units, seed=seed, dtype=dtype, device=device,
                     device_map=device_map, checkpoint_every=checkpoint_every)
    cfg = build_config(config, overrides)
    if model is None and config is None:
        raise BonsaiError("--model is required (or a --config that names one)")
    run = PruneRun(cfg, out, force=force)
    report = run.run()
    if run.dist.is_main:
        _print_prune(report, out)
    run.dist.close()


def _relaunch(processes: int) -> None:
    """Start `processes` copies of this command through torch.distributed.run and exit with its status."""
    import subprocess

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--processes":
            skip = True
            continue
        if a.startswith("--processes="):
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "bonsai", *args]
    raise typer.Exit(subprocess.call(cmd))


def _print_prune(report: dict, out: Path) -> None:
    from rich.table import Table

    from bonsai.progress import out_console as console

    t = report["totals"]
    table = Table(title=f"pruned {report['model']} -> {out}")
    for col in ("iteration", "sparsity", "sub-models", "CV tau", "penalty", "calib ppl", "seconds"):
        table.add_column(col, justify="right")
    for h in report["iterations"]:
        tau = "-" if h["cv_tau"] is None else f"{h['cv_tau']:.3f}"
        pen = "-" if h["penalty"] is None else f"{h['penalty']:.2e}"
        table.add_row(str(h["iteration"]), f"{h['sparsity']:.3f}", str(h["sub_models"]), tau, pen,
                      f"{h['calib_ppl']:.2f}", f"{h['seconds']:.1f}")
    console.print(table)
    console.print(f"block sparsity {t['sparsity']:.4f} (target {t['target_sparsity']}), "
                  f"all parameters {t['params_before']:,} -> {t['params_after']:,}, "
                  f"{t['wall_seconds']:.0f}s, peak memory {t['peak_memory_bytes'] / 2**20:.0f} MiB")


def _print_ppl(result: dict) -> None:
    from rich.table import Table

    from bonsai.progress import out_console as console

    table = Table(title=f"perplexity of {result['model']}")
    for col in ("dataset", "split", "seqlen", "windows", "tokens", "dtype", "params", "ppl"):
        table.add_column(col, justify="right")
    table.add_row(result["dataset"], result["split"], str(result["seqlen"]), str(result["windows"]),
                  str(result["tokens"]), result["dtype"], f"{result['params'] / 1e6:.2f}M", f"{result['ppl']:.3f}")
    console.print(table)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except BonsaiError as exc:
        print(f"bonsai: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("bonsai: interrupted (long runs resume when the same command is run again)", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, EOFError):
        sys.exit(1)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
