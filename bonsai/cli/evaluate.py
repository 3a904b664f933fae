"""`bonsai eval` (perplexity, zero-shot tasks) and `bonsai bench` (speed): measuring a model."""

from __future__ import annotations

from pathlib import Path

import typer

from bonsai.cli.app import MODEL_HELP, quiet_transformers, app
from bonsai.data.windows import BOS_HELP
from bonsai.errors import BonsaiError


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
    quiet_transformers()
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
    quiet_transformers()
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


def _print_ppl(result: dict) -> None:
    from rich.table import Table

    from bonsai.progress import out_console as console

    table = Table(title=f"perplexity of {result['model']}")
    for col in ("dataset", "split", "seqlen", "windows", "tokens", "dtype", "params", "ppl"):
        table.add_column(col, justify="right")
    table.add_row(result["dataset"], result["split"], str(result["seqlen"]), str(result["windows"]),
                  str(result["tokens"]), result["dtype"], f"{result['params'] / 1e6:.2f}M", f"{result['ppl']:.3f}")
    console.print(table)
