"""`bonsai prune`: its options built from the settings of every registered method (`bonsai.methods`)."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

from bonsai.cli.app import DEVICES, RUN, json_line, locked, option, quiet_transformers, app
from bonsai.data.windows import BOS_HELP
from bonsai.errors import BonsaiError


def prune_cmd(
    out: Path = option(RUN, ..., "--out", "-o", help="Output folder (pruned model, report.json, report.png, state)."),
    config: str | None = option(RUN, None, help="YAML preset: a path or a shipped preset (llama-2-7b, tiny, ...)."),
    force: bool = option(RUN, False, "--force", help="Replace an existing output folder."),
    quiet: bool = option(RUN, False, "--quiet", help="No progress, tables or notes: warnings, errors and the result only."),
    log_json: bool = option(RUN, False, "--log-json", help="One JSON line on stdout per finished iteration (its "
                                                            "report.json entry) and one with the run's totals; "
                                                            "nothing else on stdout."),
    dry_run: bool = option(RUN, False, "--dry-run", help="Print the run's cost (iterations, sub-models, forward "
                                                          "tokens, time from a timing probe, peak memory) and stop."),
    processes: int = option(DEVICES, 1, "--processes", min=1,
                             help="Processes sharing the sub-model evaluations (one replica each; a GPU each "
                                  "when GPUs are used). Same as `accelerate launch --num_processes N -m bonsai prune`."),
    **settings,
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
    quiet_transformers()
    from bonsai.methods.settings import build_config

    cfg = build_config(config, {k: (None if v is False and k in FLAG_ONLY else v) for k, v in settings.items()})
    if settings.get("model") is None and config is None:
        raise BonsaiError("--model is required (or a --config that names one)")
    if dry_run and not cfg.spec.searches:
        raise BonsaiError(f"--dry-run estimates bonsai's sub-model search; {cfg.method} needs no estimate "
                          "(one calibration pass, see docs/benchmarks.md)")
    run_class = cfg.spec.load_runner()
    if dry_run:
        run = run_class(cfg, out, dry_run=True)
        _print_estimate(run, cfg)
        return
    with locked(out):
        run = run_class(cfg, out, force=force)
        if not cfg.spec.searches:
            report = run.run()
            _print_baseline(report, out)
            if log_json:
                json_line({"totals": report["totals"], "out": str(out)})
            return
        if log_json:
            run.on_iteration = json_line
        report = run.run()
    if run.dist.is_main:
        _print_prune(report, out)
        if log_json:
            json_line({"totals": report["totals"], "out": str(out), "emptied_groups": report["emptied_groups"]})
    run.dist.close()


FLAG_ONLY: set[str] = set()  # settings given as a bare flag (--global): False means "not given"


def _settings_options() -> list[inspect.Parameter]:
    """`bonsai prune`'s options for every setting, built from the registry: the shared settings under their
    panels, then each method's own under its panel, so a method's module is all it takes to add its options."""
    from typing import get_type_hints

    from bonsai.methods.registry import METHODS, option_fields
    from bonsai.methods.settings import RunSettings, method_settings

    helps = {"method": " | ".join(METHODS) + " (default bonsai; `bonsai methods` says what each does).", "bos": BOS_HELP}
    params: dict[str, inspect.Parameter] = {}
    for settings in (RunSettings, *method_settings()):
        hints = get_type_hints(settings)
        panel = getattr(settings, "PANEL", RUN)
        for f in option_fields(settings):
            if f.name in params:
                continue
            meta = f.metadata
            flags = meta["flags"] or (f"--{f.name.replace('_', '-')}",)
            kind = hints[f.name]
            default = None
            if kind is bool and "/" not in flags[0]:  # a bare flag: off unless given
                FLAG_ONLY.add(f.name)
                default = False
            elif kind is bool:
                kind = bool | None
            elif type(None) not in getattr(kind, "__args__", ()):
                kind = kind | None  # None: not given, so the preset and the defaults decide
            option = typer.Option(default, *flags, help=helps.get(f.name, meta["help"]),
                                  rich_help_panel=meta["panel"] or panel, **meta["typer"])
            params[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
    return list(params.values())


def _register_prune() -> None:
    fixed = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
             for p in inspect.signature(prune_cmd, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
    first = {name: i for i, name in enumerate(PRUNE_ORDER)}
    params = sorted(fixed + _settings_options(), key=lambda p: first.get(p.name, len(first)))
    params = [p for p in params if p.name in first or p not in fixed] + [p for p in fixed if p.name not in first]

    def command(**kwargs):
        fixed_names = {p.name for p in fixed}
        return prune_cmd(**{k: v for k, v in kwargs.items() if k in fixed_names},
                         **{k: v for k, v in kwargs.items() if k not in fixed_names})

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = prune_cmd.__doc__
    app.command("prune")(command)


# where the run's own options go in --help (the rest follow in the registry's order)
PRUNE_ORDER = ("model", "sparsity", "out", "config", "method", "seed", "force", "quiet", "log_json", "dry_run")


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
        search = h.get("allocation_search")
        if search:  # the search may take a group past its floor: say where it went instead
            beyond = search["beyond_floor"]
            console.print(f"iteration {h['iteration']}: allocation search kept the {search['chosen']} allocation "
                          f"({search['sub_models']} sub-models, {search['moved_share']:.0%} of the removal moved); "
                          f"{len(beyond)} group(s) past the probes' floor" + (f": {', '.join(beyond[:8])}" if beyond
                                                                             else "") + (" ..." if len(beyond) > 8 else ""))
        elif floor and h["sub_models"]:
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


_register_prune()
