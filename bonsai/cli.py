"""The `bonsai` command line."""

from __future__ import annotations

import sys
from pathlib import Path

from bonsai.runtime import configure_threads

configure_threads()  # before torch is imported anywhere

import typer

from bonsai.data.windows import BOS_HELP
from bonsai.errors import BonsaiError

app = typer.Typer(
    help="Structured pruning of LLMs with forward passes only (Bonsai). Run `bonsai COMMAND --help`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)

# prune --help panels
RUN = 'The run'
CALIB = 'Calibration'
SELECT = 'Bonsai selection (default)'
PAPER = 'Paper selection (--selection paper) and ablations'
REFIT = 'Reconstruction (every structured method)'
SHAPES = 'Serving shapes and units'
BASELINES = 'Baselines (--method wanda | llm-pruner | besa | flap)'
DEVICES = 'Devices and resume'


def _option(panel: str, *args, **kwargs):
    """A typer option shown under `panel` in --help (prune's options grouped by what they belong to)."""
    return typer.Option(*args, rich_help_panel=panel, **kwargs)


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
    target: str | None = typer.Argument(None, help="Comma-separated perplexity datasets (wikitext2, c4, kjv, austen, a local "
                                                    ".txt/.jsonl file) and lm-eval task names (boolq, hellaswag, ...)."),
    model: str = typer.Option(..., "--model", "-m", help=MODEL_HELP),
    suite: str | None = typer.Option(None, help="Task preset: paper (Table 3, zero-shot) or openllm (Table 4 few-shot)."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="Few-shot examples for the tasks (task default)."),
    limit: int | None = typer.Option(None, help="Evaluate only the first N documents of each task (for quick checks)."),
    include_path: str | None = typer.Option(None, "--include-path", help="Folder of extra lm-eval task YAMLs."),
    seqlen: int | None = typer.Option(None, help="Window length; default 2048 capped at the model's max positions."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Windows (or task requests) per forward pass."),
    split: str = typer.Option("test", help="Split of a hub dataset: test, validation or train."),
    max_windows: int | None = typer.Option(None, min=1, help="Evaluate only the first N windows."),
    bos: str = typer.Option("auto", help=BOS_HELP),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16 (auto: float32 on CPU, checkpoint dtype on GPU)."),
    device: str = typer.Option("auto", help="auto|cpu|cuda|cuda:N"),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoint (off by default)."),
) -> None:
    """Perplexity (non-overlapping windows, Wanda/SparseGPT protocol) and zero/few-shot tasks through lm-eval."""
    _quiet_transformers()
    from bonsai.data.sources import ALIASES, DATASETS, is_local_file
    from bonsai.data.windows import BOS_MODES
    from bonsai.eval.runner import run_perplexity

    if bos not in BOS_MODES:
        raise BonsaiError(f"unknown --bos {bos!r}: choose from {', '.join(BOS_MODES)}")
    items = [t.strip() for t in (target or "").split(",") if t.strip()]
    if not items and suite is None:
        raise BonsaiError("name what to evaluate: a dataset (kjv, wikitext2, ...), task names, or --suite paper|openllm")
    if limit is not None and limit <= 0:
        raise BonsaiError(f"--limit must be positive (got {limit})")
    if num_fewshot is not None and num_fewshot < 0:
        raise BonsaiError(f"--num-fewshot must be >= 0 (got {num_fewshot})")
    ppl_targets = [t for t in items if ALIASES.get(t, t) in DATASETS or is_local_file(t)]
    tasks: dict[str, int | None] = {t: num_fewshot for t in items if t not in ppl_targets}
    if suite is not None:
        from bonsai.eval.tasks import SUITES

        if suite not in SUITES:
            raise BonsaiError(f"unknown --suite {suite!r}: choose from {', '.join(SUITES)}")
        for name, shots in SUITES[suite].items():
            tasks.setdefault(name, shots if num_fewshot is None else num_fewshot)
    manager = None
    if tasks:
        from bonsai.eval.tasks import check_task_names, task_manager

        manager = task_manager(include_path)
        check_task_names(list(tasks), manager)
    from bonsai.export.llamacpp import is_gguf

    if is_gguf(model):  # a GGUF export, run by llama.cpp itself
        if tasks:
            raise BonsaiError("lm-eval tasks run on Hugging Face folders; evaluate the folder the GGUF was exported from")
        from bonsai.export.llamacpp import gguf_context_length, gguf_perplexity

        results = {"model": model, "perplexity": {}, "tasks": {}}
        for t in ppl_targets:
            length = seqlen or min(2048, gguf_context_length(model))
            result = gguf_perplexity(t, model, seqlen=length, split=split, max_windows=max_windows, bos=bos)
            _print_ppl(result)
            results["perplexity"][result["dataset"]] = result
        if json_path is not None:
            from bonsai.io import write_json_atomic

            write_json_atomic(json_path, next(iter(results["perplexity"].values())) if len(ppl_targets) == 1 else results)
        return
    from bonsai.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model, trust_remote_code)
    from bonsai.data.windows import prepare_text, resolve_bos

    for t in ppl_targets:  # before the model: the tokenizer's peak stays below the model's
        prepare_text(tokenizer, t, split, special=resolve_bos(tokenizer, bos) is None)
    loaded = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    results: dict = {"model": model, "perplexity": {}, "tasks": {}}
    for t in ppl_targets:
        result = run_perplexity(t, model, seqlen=seqlen, batch_size=batch_size, split=split, max_windows=max_windows,
                                model=loaded, tokenizer=tokenizer, bos=bos)
        _print_ppl(result)
        results["perplexity"][result["dataset"]] = result
    if tasks:
        from bonsai.eval.tasks import run_tasks

        add_bos = {"always": True, "never": False}.get(bos, True if resolve_bos(tokenizer, bos) is not None else None)
        results["tasks"] = run_tasks(loaded, tokenizer, tasks, manager, batch_size=batch_size, limit=limit,
                                     add_bos=add_bos)
        results["bos"] = bos
        results["limit"] = limit
        _print_tasks(results["tasks"], model)
    if json_path is not None:
        from bonsai.io import write_json_atomic

        # a single perplexity target keeps the flat layout of earlier versions
        flat = len(ppl_targets) == 1 and not tasks
        write_json_atomic(json_path, next(iter(results["perplexity"].values())) if flat else results)


def _print_tasks(tasks: dict, model: str) -> None:
    from rich.table import Table

    from bonsai.progress import out_console as console

    table = Table(title=f"tasks of {model}")
    for col in ("task", "shots", "samples", "metric", "value", "stderr"):
        table.add_column(col, justify="right")
    for task, metrics in tasks.items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name in ("num_fewshot", "samples", "sample_len") or value is None:
                continue
            err = metrics.get(f"{name}_stderr")
            table.add_row(task, str(metrics.get("num_fewshot")), str(metrics.get("samples")), name, f"{value:.4f}",
                          "-" if err is None else f"{err:.4f}")
    console.print(table)


@app.command("bench")
def bench_cmd(
    model: str = typer.Option(..., "--model", "-m", help="The pruned (or otherwise compressed) model."),
    baseline: str = typer.Option(..., "--baseline", help="The parent model to compare against."),
    seqlen: int | None = typer.Option(None, help="Tokens per forward window (default 2048 capped at max positions)."),
    batch_sizes: str = typer.Option("1,8", "--batch-sizes", help="Comma-separated batch sizes."),
    generate_tokens: int = typer.Option(128, "--generate-tokens", help="Tokens generated per throughput run (0: skip)."),
    repeats: int = typer.Option(5, help="Timed repeats per setting (median reported), after 2 warm-ups."),
    dtype: str = typer.Option("auto", help="auto|float32|bfloat16|float16."),
    device: str = typer.Option("auto", help="auto|cpu|cuda|cuda:N."),
    sparse_kernels: bool = typer.Option(False, "--sparse-kernels",
                                        help="Run exact 2:4 linears with PyTorch semi-structured kernels (GPU sm80+)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results as JSON to this file."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoints (off by default)."),
) -> None:
    """Speedup of MODEL over BASELINE: forward latency over seqlen-token windows and generation throughput
    (transformers), or prompt and generation tokens/s in llama.cpp when both are GGUF files."""
    _quiet_transformers()
    from bonsai.export.llamacpp import is_gguf

    if is_gguf(model) or is_gguf(baseline):
        if not (is_gguf(model) and is_gguf(baseline)):
            raise BonsaiError("compare a GGUF file with a GGUF file (export the other model with `bonsai export`)")
        from bonsai.bench.llamacpp_speed import run_gguf_bench
        from bonsai.progress import out_console

        result = run_gguf_bench(model, baseline, prompt=seqlen or 256, generate=generate_tokens, repeats=repeats)
        m, b = result["models"]["model"], result["models"]["baseline"]
        out_console.print(f"llama.cpp, median of {repeats}: prompt {m['prompt_tokens_per_second']:.1f} vs "
                          f"{b['prompt_tokens_per_second']:.1f} tok/s ({result['speedup']['prompt']:.2f}x)"
                          + (f", generation {m['generate_tokens_per_second']:.1f} vs {b['generate_tokens_per_second']:.1f}"
                             f" tok/s ({result['speedup']['generate']:.2f}x)" if generate_tokens else "")
                          + f"; parameter ratio {result['param_ratio']:.2f}x")
        if json_path is not None:
            from bonsai.io import write_json_atomic

            write_json_atomic(json_path, result)
        return
    from bonsai.bench.speed import run_bench
    from bonsai.progress import make_progress

    try:
        sizes = [int(x) for x in batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise BonsaiError(f"--batch-sizes must be comma-separated integers (got {batch_sizes!r})") from None
    with make_progress(transient=True) as progress:
        result = run_bench(model, baseline, seqlen, sizes, generate_tokens, repeats, dtype, device, sparse_kernels,
                           trust_remote_code=trust_remote_code, progress=progress)
    _print_bench(result)
    if json_path is not None:
        from bonsai.io import write_json_atomic

        write_json_atomic(json_path, result)


def _print_bench(result: dict) -> None:
    from rich.table import Table

    from bonsai.progress import console as err_console
    from bonsai.progress import out_console as console

    m, b = result["models"]["model"], result["models"]["baseline"]
    table = Table(title=f"{m['name']} vs {b['name']} ({result['device']}, {result['dtype']}, median of {result['repeats']})")
    for col in ("batch", "seqlen", "forward ms", "baseline ms", "speedup", "gen tok/s", "baseline tok/s", "gen speedup"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        gen = "generate_speedup" in r
        table.add_row(str(r["batch_size"]), str(r["seqlen"]), f"{r['forward_seconds_model'] * 1e3:.1f}",
                      f"{r['forward_seconds_baseline'] * 1e3:.1f}", f"{r['speedup']:.2f}x",
                      f"{r['generate_tokens_per_second_model']:.1f}" if gen else "-",
                      f"{r['generate_tokens_per_second_baseline']:.1f}" if gen else "-",
                      f"{r['generate_speedup']:.2f}x" if gen else "-")
    console.print(table)
    console.print(f"parameters {m['params']:,} vs {b['params']:,} (ratio {result['param_ratio']:.3f}), "
                  f"FLOPs/token ratio {result['flop_ratio']:.3f}, weights {m['bytes'] / 2**20:.1f} MiB vs "
                  f"{b['bytes'] / 2**20:.1f} MiB")
    for note in result["notes"]:
        err_console.print(f"[yellow]note: {note}")


@app.command("prune")
def prune_cmd(
    model: str | None = _option(RUN, None, "--model", "-m", help=MODEL_HELP),
    sparsity: float | None = _option(RUN, None, help="Fraction of transformer-block parameters to remove, in (0,1)."),
    out: Path = _option(RUN, ..., "--out", "-o", help="Output folder (pruned model, report.json, report.png, state)."),
    config: str | None = _option(RUN, None, help="YAML preset: a path or a shipped preset (llama-2-7b, tiny, ...)."),
    method: str | None = _option(RUN, None, help="bonsai | prior-only | no-regression | random (paper Fig. 2) | "
                                                 "baselines: wanda | llm-pruner | besa | flap."),
    seed: int | None = _option(RUN, None, help="Random seed (same seed, same model)."),
    force: bool = _option(RUN, False, "--force", help="Replace an existing output folder."),
    quiet: bool = _option(RUN, False, "--quiet", help="No progress, tables or notes: warnings, errors and the result only."),
    log_json: bool = _option(RUN, False, "--log-json", help="One JSON line on stdout per finished iteration (its "
                                                            "report.json entry) and one with the run's totals; "
                                                            "nothing else on stdout."),
    dry_run: bool = _option(RUN, False, "--dry-run", help="Print the run's cost (iterations, sub-models, forward "
                                                          "tokens, time from a timing probe, peak memory) and stop."),
    calib: str | None = _option(CALIB, None, help="Calibration data: wikitext2, c4, kjv, austen or a local file; "
                                                "several joined by + are mixed (austen+kjv)."),
    calib_samples: int | None = _option(CALIB, None, "--calib-samples", help="Calibration windows (default 32)."),
    seqlen: int | None = _option(CALIB, None, help="Calibration window length (default 2048 capped at max positions)."),
    bos: str | None = _option(CALIB, None, help=BOS_HELP),
    batch_size: int | None = _option(CALIB, None, "--batch-size", "-b", help="Rows per forward pass (rows may mix sub-models)."),
    prior: str | None = _option(SELECT, None, help="obs (default: each unit's error after the run's refit, "
                                                "relative to the residual stream) | wanda | activation | magnitude | "
                                                "uniform (paper Fig. 3)."),
    p_iter: float | None = _option(SELECT, None, "--p-iter", help="Fraction pruned per iteration (default: 0.3 for bonsai's "
                                                              "probe selection, 0.1 for it with --reconstruct none, the "
                                                              "paper's 0.05 otherwise)."),
    probe_depths: int | None = _option(SELECT, None, "--probe-depths",
                                            help="probe selection: depths probed per layer group (default 1: one "
                                                 "sub-model per group, 2L per iteration)."),
    candidate_multiple: float | None = _option(SELECT, None, "--candidate-multiple",
                                                    help="Candidates per layer group and iteration: the lowest "
                                                         "multiple x p_iter of its units by prior (default 2, the "
                                                         "paper's; the rest are fixed)."),
    selection: str | None = _option(SELECT, None, help="probe (default): one sub-model per layer group, its measured "
                                                    "cost spread over its units by their compensated errors | paper: "
                                                    "random unit masks, one regression coefficient per unit."),
    compensate: bool | None = _option(SELECT, None, "--compensate/--no-compensate",
                                           help="Evaluate sub-models with their dropped units compensated (the refit "
                                                "to come; default with --reconstruct lstsq) instead of zeroed (the paper)."),
    sequential_obs: bool | None = _option(SELECT, None, "--sequential-obs/--no-sequential-obs",
                                               help="Rank each group's candidates along their greedy joint removal "
                                                    "(sequential OBS: remove the cheapest, update, repeat) instead of "
                                                    "by each unit's compensated error alone (default with --prior obs, "
                                                    "--reconstruct lstsq and the probe selection)."),
    utility: str | None = _option(SELECT, None, help="A sub-model's utility: kl (default: -KL from the current model's "
                                                  "next-token distributions) | loss (-LM loss, the paper's)."),
    samples: int | None = _option(PAPER, None, help="paper selection: sub-models evaluated per iteration (default 200)."),
    adaptive: bool | None = _option(PAPER, None, "--adaptive/--no-adaptive",
                                         help="paper selection: evaluate sub-models in rounds and stop an iteration "
                                              "once the units it would remove have settled (--samples the maximum; "
                                              "default on with --selection paper, off in the paper-* presets)."),
    adaptive_round: int | None = _option(PAPER, None, "--adaptive-round",
                                              help="--adaptive: sub-models per round (even; default a tenth of "
                                                   "--samples, at least 8)."),
    adaptive_tol: float | None = _option(PAPER, None, "--adaptive-tol",
                                              help="--adaptive: stop when at most this share of the parameters to "
                                                   "remove changed since the last round (default 0.3)."),
    regression: str | None = _option(PAPER, None, help="lasso (L1, default) | ridge (L2)."),
    per_parameter: bool | None = _option(PAPER, None, "--per-parameter/--per-unit",
                                              help="paper selection: rank units by coefficient per parameter."),
    reconstruct: str | None = _option(REFIT, None, help="Refit after each removal (every structured method): lstsq "
                                                      "(least-squares output projections, default) | bias (FLAP's) | none "
                                                      "(the paper's Bonsai)."),
    reconstruct_damp: float | None = _option(REFIT, None, "--reconstruct-damp",
                                                  help="lstsq damping, relative to the Gram matrix's mean diagonal (0.01)."),
    reconstruct_samples: int | None = _option(REFIT, None, "--reconstruct-samples",
                                                   help="Calibration windows for the refit and the compensation statistics "
                                                        "(default: 16 tokens per input column of the widest output "
                                                        "projection, at least --calib-samples)."),
    refit_target: str | None = _option(REFIT, None, "--refit-target",
                                            help="What lstsq fits each output projection to: residual (the residual "
                                                 "stream of the model before the removal, default; every block from "
                                                 "the first pruned one is refit) | own (its own output before it)."),
    width_multiple: int | None = _option(SHAPES, None, "--width-multiple",
                                              help="Keep every layer's MLP width a multiple of N (0 allowed): widths "
                                                   "that tile and quantise well (llama.cpp K-quants need 256)."),
    head_multiple: int | None = _option(SHAPES, None, "--head-multiple",
                                             help="Keep every layer's attention units (key/value groups) a multiple of N."),
    allocation: str | None = _option(SHAPES, None, help="global (per-layer sizes, default) | uniform (the same sizes in "
                                                     "every layer: a stock config every engine loads)."),
    split_probes: int | None = _option(SHAPES, None, "--split-probes",
                                            help="--allocation uniform with bonsai: measure the N least-cost "
                                                 "attention/MLP splits as sub-models and keep the best (default 3; "
                                                 "1: the scores alone decide)."),
    units: str | None = _option(SHAPES, None, help="Unit kinds to prune: attention,mlp (default), attention or mlp."),
    sparsity_type: str | None = _option(BASELINES, None, "--sparsity-type", help="wanda: unstructured | 2:4 | 4:8."),
    llmp_importance: str | None = _option(BASELINES, None, "--llmp-importance",
                                               help="llm-pruner: vector | element1 (default) | element2."),
    llmp_aggregation: str | None = _option(BASELINES, None, "--llmp-aggregation", help="llm-pruner: sum | prod | max | last."),
    llmp_layer_start: int | None = _option(BASELINES, None, "--llmp-layer-start", help="llm-pruner: first layer pruned."),
    llmp_layer_end: int | None = _option(BASELINES, None, "--llmp-layer-end", help="llm-pruner: layer after the last pruned."),
    global_ranking: bool = _option(BASELINES, False, "--global", help="llm-pruner: one global ranking instead of uniform."),
    besa_granularity: str | None = _option(BASELINES, None, "--besa-granularity", help="besa: row (default) | layer."),
    besa_levels: int | None = _option(BASELINES, None, "--besa-levels", help="besa: candidate sparsity levels D (100)."),
    besa_epochs: int | None = _option(BASELINES, None, "--besa-epochs", help="besa: epochs per block (1)."),
    besa_lr: float | None = _option(BASELINES, None, "--besa-lr", help="besa: learning rate of the sparsity logits (0.05)."),
    besa_penalty: float | None = _option(BASELINES, None, "--besa-penalty", help="besa: weight of the sparsity penalty (5)."),
    besa_wbits: int | None = _option(BASELINES, None, "--besa-wbits", help="besa: joint fake-quantisation to N bits."),
    dtype: str | None = _option(DEVICES, None, help="auto|float32|bfloat16|float16."),
    device: str | None = _option(DEVICES, None, help="auto|cpu|cuda|cuda:N."),
    device_map: str | None = _option(DEVICES, None, "--device-map",
                                          help="accelerate placement (e.g. auto) for models larger than one device."),
    checkpoint_every: int | None = _option(DEVICES, None, "--checkpoint-every",
                                           help="Save state every N sub-models (default 10)."),
    processes: int = _option(DEVICES, 1, "--processes", min=1,
                                  help="Processes sharing the sub-model evaluations (one replica each; a GPU each "
                                       "when GPUs are used). Same as `accelerate launch --num_processes N -m bonsai prune`."),
) -> None:
    """Prune a model with Bonsai to the target sparsity; rerun the same command to resume."""
    import os

    from bonsai.progress import console as err_console
    from bonsai.progress import out_console

    if quiet:
        err_console.quiet = True
    if quiet or log_json:
        out_console.quiet = True  # stdout holds the JSON lines alone
    if processes > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(processes)
    _quiet_transformers()
    from bonsai.prune.config import BASELINE_METHODS, build_config
    from bonsai.prune.runner import PruneRun

    overrides = dict(model=model, sparsity=sparsity, method=method, prior=prior, p_iter=p_iter, samples=samples,
                     probe_depths=probe_depths, candidate_multiple=candidate_multiple, adaptive=adaptive,
                     adaptive_round=adaptive_round, adaptive_tol=adaptive_tol,
                     calib=calib, calib_samples=calib_samples, seqlen=seqlen, bos=bos, batch_size=batch_size,
                     regression=regression, selection=selection, compensate=compensate, sequential_obs=sequential_obs,
                     per_parameter=per_parameter,
                     utility=utility, width_multiple=width_multiple, head_multiple=head_multiple,
                     allocation=allocation, split_probes=split_probes,
                     units=units, seed=seed, dtype=dtype, device=device,
                     device_map=device_map, checkpoint_every=checkpoint_every, sparsity_type=sparsity_type,
                     llmp_importance=llmp_importance, llmp_aggregation=llmp_aggregation,
                     llmp_layer_start=llmp_layer_start, llmp_layer_end=llmp_layer_end,
                     global_ranking=global_ranking or None, besa_granularity=besa_granularity, besa_levels=besa_levels,
                     besa_epochs=besa_epochs, besa_lr=besa_lr, besa_penalty=besa_penalty, besa_wbits=besa_wbits,
                     reconstruct=reconstruct, reconstruct_damp=reconstruct_damp, reconstruct_samples=reconstruct_samples,
                     refit_target=refit_target)
    cfg = build_config(config, overrides)
    if model is None and config is None:
        raise BonsaiError("--model is required (or a --config that names one)")
    if dry_run and cfg.method in BASELINE_METHODS:
        raise BonsaiError(f"--dry-run estimates bonsai's sub-model search; {cfg.method} needs no estimate "
                          "(one calibration pass, see docs/benchmarks.md)")
    if dry_run:
        _print_estimate(PruneRun(cfg, out, dry_run=True), cfg)
        return
    with _locked(out):
        if cfg.method in BASELINE_METHODS:
            from bonsai.baselines.runner import BaselineRun

            report = BaselineRun(cfg, out, force=force).run()
            _print_baseline(report, out)
            if log_json:
                _json_line({"totals": report["totals"], "out": str(out)})
            return
        run = PruneRun(cfg, out, force=force)
        if log_json:
            run.on_iteration = _json_line
        report = run.run()
    if run.dist.is_main:
        _print_prune(report, out)
        if log_json:
            _json_line({"totals": report["totals"], "out": str(out), "emptied_groups": report["emptied_groups"]})
    run.dist.close()


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
    _quiet_transformers()
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


@app.command("finetune")
def finetune_cmd(
    model: str | None = typer.Option(None, "--model", "-m", help="The pruned model (folder from `bonsai prune`)."),
    teacher: str | None = typer.Option(None, help="The parent model, for distillation (needed unless --distill-weight 0)."),
    data: str | None = typer.Option(None, help="Training text: wikitext2, c4, kjv, austen or a local .txt/.jsonl file."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for the finetuned model and report.json."),
    config: str | None = typer.Option(None, help="YAML preset: a shipped finetune-NAME preset (llama-2-7b, tiny) or a path."),
    lora_rank: int | None = typer.Option(None, "--lora-rank", help="LoRA rank (default 128)."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 4 x rank)."),
    lora_dropout: float | None = typer.Option(None, "--lora-dropout", help="LoRA dropout (default 0.05)."),
    lr: float | None = typer.Option(None, help="Learning rate (default 1e-4), linear decay."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Linear warm-up steps (default 0)."),
    distill_weight: float | None = typer.Option(None, "--distill-weight", help="Weight of the KL term (default 0.01; 0: off)."),
    kl_direction: str | None = typer.Option(None, "--kl-direction", help="forward: KL(parent||student) (default); reverse."),
    top_k: int | None = typer.Option(None, "--top-k", help="Teacher log-probabilities cached per token (default 64)."),
    seqlen: int | None = typer.Option(None, help="Training window length (default 512)."),
    bos: str | None = typer.Option(None, help=BOS_HELP),
    samples: int | None = typer.Option(None, help="Training windows (default: all of the train split; c4: 30000)."),
    epochs: int | None = typer.Option(None, help="Passes over the training windows (default 1)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Windows per micro-batch (default 1)."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step (default 1)."),
    eval_every: int | None = typer.Option(None, "--eval-every", help="Held-out perplexity every N steps (default: 5 times)."),
    eval_windows: int | None = typer.Option(None, "--eval-windows", help="Held-out windows (default 32)."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Checkpoint every N steps (default 200)."),
    log_every: int | None = typer.Option(None, "--log-every", help="Record the mean losses every N steps (default 10)."),
    full: bool = typer.Option(False, "--full", help="Train all weights instead of LoRA (the paper's Phi-2 recipe)."),
    no_merge: bool = typer.Option(False, "--no-merge", help="Keep LoRA separate (DIR/adapter beside unmerged weights)."),
    seed: int | None = typer.Option(None, help="Random seed (default 0)."),
    dtype: str | None = typer.Option(None, help="auto|float32|bfloat16|float16 (auto: fp32 on CPU, half on GPU)."),
    device: str | None = typer.Option(None, help="auto|cpu|cuda|cuda:N."),
    cache_dir: str | None = typer.Option(None, "--cache-dir", help="Teacher-logit caches (default: beside DIR)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in DIR (what rerunning the same command does anyway)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the checkpoints (off by default)."),
) -> None:
    """Recover a pruned model: LoRA on every block linear + distillation from cached parent logits, merged back."""
    _quiet_transformers()
    from bonsai.finetune.config import build_finetune_config
    from bonsai.finetune.trainer import FinetuneRun

    overrides = dict(model=model, teacher=teacher, data=data, lora_rank=lora_rank, lora_alpha=lora_alpha,
                     lora_dropout=lora_dropout, lr=lr, warmup_steps=warmup_steps, distill_weight=distill_weight,
                     kl_direction=kl_direction, top_k=top_k, seqlen=seqlen, bos=bos, samples=samples, epochs=epochs,
                     steps=steps, batch_size=batch_size, grad_accum=grad_accum, eval_every=eval_every,
                     eval_windows=eval_windows, checkpoint_every=checkpoint_every, log_every=log_every, seed=seed, dtype=dtype,
                     device=device, cache_dir=cache_dir, full=full or None, merge=False if no_merge else None)
    if model is None and config is None:
        raise BonsaiError("--model is required (or a --config that names one)")
    cfg = build_finetune_config(config, overrides)
    with _locked(out):
        report = FinetuneRun(cfg, out, force=force, resume=resume, trust_remote_code=trust_remote_code).run()
    _print_finetune(report, out)


def _json_line(record: dict) -> None:
    """One machine-readable line on stdout (`--log-json`), whatever else is quiet."""
    import json

    print(json.dumps(record, default=str), flush=True)


def _print_finetune(report: dict, out: Path) -> None:
    from bonsai.progress import out_console as console

    console.print(f"finetuned {report['model']} -> {out} ({report['mode']}, {report['trainable_params']:,} trainable "
                  f"parameters, {report['total_steps']} steps, {report['tokens_seen']:,} tokens)")
    console.print(f"held-out ppl ({report['data']['held_out']}): {report['ppl_before']:.3f} -> {report['ppl_after']:.3f}; "
                  f"{report['wall_seconds']:.0f}s, peak memory {report['peak_memory_bytes'] / 2**20:.0f} MiB")


def _locked(out: Path):
    """One run per output folder (see bonsai.runlock); other processes of a multi-process run share it."""
    import contextlib

    from bonsai.runlock import RunLock, main_process

    return RunLock(out) if main_process() else contextlib.nullcontext()


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
    probe = any(h.get("probe_increase") for h in report["iterations"])
    cols = ("probe cost min", "probe cost max") if probe else ("CV tau", "penalty")
    for col in ("iteration", "sparsity", "sub-models", *cols, "refit error", "calib ppl", "seconds"):
        table.add_column(col, justify="right")
    for h in report["iterations"]:
        if probe:
            costs = [v for v in (h.get("probe_increase") or {}).values() if v is not None]
            a = "-" if not costs else f"{min(costs):.2e}"
            b = "-" if not costs else f"{max(costs):.2e}"
        else:
            a = "-" if h["cv_tau"] is None else f"{h['cv_tau']:.3f}"
            b = "-" if h["penalty"] is None else f"{h['penalty']:.2e}"
        rec = h.get("reconstruction")
        refit = "-" if not rec else f"{rec['mean_error_dropped']:.3f} → {rec['mean_error_refit']:.3f}"
        table.add_row(str(h["iteration"]), f"{h['sparsity']:.3f}", str(h["sub_models"]), a, b, refit,
                      f"{h['calib_ppl']:.2f}", f"{h['seconds']:.1f}")
    console.print(table)
    console.print(f"block sparsity {t['sparsity']:.4f} (target {t['target_sparsity']}), "
                  f"all parameters {t['params_before']:,} -> {t['params_after']:,}, "
                  f"{t['wall_seconds']:.0f}s, peak memory {t['peak_memory_bytes'] / 2**20:.0f} MiB")
    for h in report["iterations"]:
        floor = h.get("at_floor") or []
        if floor and h["sub_models"]:
            console.print(f"iteration {h['iteration']}: {len(floor)} group(s) gave every candidate (at the floor the step "
                          f"--p-iter sets, not where their measurement would stop): {', '.join(floor[:8])}"
                          + (" ..." if len(floor) > 8 else ""))
    for e in report.get("emptied_groups", []):
        evidence = (f": probe cost {e['probe_increase']:.3g} against a median of {e['median_probe_increase']:.3g}"
                    if "probe_increase" in e else "")
        console.print(f"group {e['group']} emptied in iteration {e['iteration']} ({e['units_before']} units){evidence}")


def _print_estimate(run, cfg) -> None:
    from rich.table import Table

    from bonsai.progress import out_console as console

    cost = run.estimate()
    table = Table(title=f"cost of pruning {cfg.model} to {cfg.sparsity} ({cfg.selection} selection)")
    for col in ("iterations", "sub-models / iter", "block tokens", "estimated time", "peak memory", "largest phase"):
        table.add_column(col, justify="right")
    hours = cost.seconds / 3600
    table.add_row(str(cost.iterations), str(cost.sub_models_per_iteration), f"{cost.block_tokens / 1e6:.2f}M",
                  f"{hours:.2f} h" if hours >= 1 else f"{cost.seconds / 60:.1f} min",
                  f"{cost.peak_bytes / 2**30:.2f} GiB", cost.peak_phase)
    console.print(table)
    console.print(f"peak = the model as loaded ({cost.base_bytes / 2**30:.2f} GiB) + its largest phase: "
                  + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in cost.phase_bytes.items()) + " GiB; time: "
                  f"{cost.seconds_per_block_token * 1e6:.1f} us a token through the blocks, "
                  f"{cost.seconds_per_head_token * 1e6:.1f} us through the head"
                  + (f", sequential OBS {cost.obs_seconds:.0f} s" if cost.obs_seconds else ""))


def _print_baseline(report: dict, out: Path) -> None:
    from bonsai.progress import out_console as console

    t = report["totals"]
    kind = "block sparsity" if report["structured"] else "block-linear weight sparsity"
    console.print(f"pruned {report['model']} with {report['method']} -> {out}")
    console.print(f"{kind} {t['sparsity']:.4f} (target {t['target_sparsity']}), parameters {t['params_before']:,} -> "
                  f"{t['params_after']:,} ({t['nonzero_params_after']:,} non-zero), {t['wall_seconds']:.0f}s, "
                  f"peak memory {t['peak_memory_bytes'] / 2**20:.0f} MiB")


def _print_ppl(result: dict) -> None:
    from rich.table import Table

    from bonsai.progress import out_console as console

    table = Table(title=f"perplexity of {result['model']}")
    for col in ("dataset", "split", "seqlen", "windows", "tokens", "dtype", "params", "ppl"):
        table.add_column(col, justify="right")
    table.add_row(result["dataset"], result["split"], str(result["seqlen"]), str(result["windows"]),
                  str(result["tokens"]), result["dtype"], f"{result['params'] / 1e6:.2f}M", f"{result['ppl']:.3f}")
    console.print(table)


RESUME_HINT = "prune, BESA and finetune resume from their last checkpoint when the same command is run again"


class Stopped(BaseException):
    """SIGTERM or Ctrl-C, raised in the main thread so that the usual cleanup runs (temporary files go, the
    lock is released, checkpoints already written stay). Not a KeyboardInterrupt: typer would turn that
    into a silent exit status."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame) -> None:
    raise Stopped(signum)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    import signal

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        status = app(standalone_mode=False)
    except BonsaiError as exc:
        print(f"bonsai: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (Stopped, KeyboardInterrupt) as exc:
        term = isinstance(exc, Stopped) and exc.signum == signal.SIGTERM
        print(f"bonsai: {'terminated' if term else 'interrupted'}; {RESUME_HINT}", file=sys.stderr)
        sys.exit(143 if term else 130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, EOFError):
        sys.exit(1)
    except Exception as exc:  # click usage errors (unknown option, bad value) arrive here in non-standalone mode
        if isinstance(exc, _click_exception_types()):
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `bonsai {ctx.command.name} --help`)" if ctx is not None and ctx.command.name else ""
            message = " ".join(exc.format_message().split())
            if message:  # empty when the help was shown for a bare command
                print(f"bonsai: error: {message}{hint}", file=sys.stderr)
            sys.exit(exc.exit_code)
        raise
    if isinstance(status, int) and status:  # typer returns the status of an Exit in non-standalone mode
        if status == 130:  # a KeyboardInterrupt that typer caught before us
            print(f"bonsai: interrupted; {RESUME_HINT}", file=sys.stderr)
        sys.exit(status)


def _click_exception_types() -> tuple[type, ...]:
    """Typer >= 0.16 vendors click as `typer._click`; older ones use click itself."""
    types = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            pass
    return tuple(types)


if __name__ == "__main__":
    main()
