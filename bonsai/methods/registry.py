"""Pruning methods by name: what `bonsai prune --method NAME` runs, with the settings dataclass that holds its own
options, registered by the module that implements it (`@register_method`), as adapters register families.

A method's settings are a dataclass whose fields carry their command-line flag and help (`option`); the command
line builds each method's options and help panel from here, and the run's settings (`bonsai.methods.settings`)
are the shared ones plus every method's, so a new method is one module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import Any

from bonsai.errors import BonsaiError

@dataclass(frozen=True)
class MethodSpec:
    """What the rest of bonsai needs to know about a method, so that no code compares method names."""

    name: str
    settings: type  # its settings dataclass (shared by the variants of one method, e.g. bonsai's ablations)
    runner: str  # "module:Class" of its run (Class(cfg, out, force=...).run() -> report), imported when it runs
    summary: str  # one line for --help and the docs
    structured: bool  # removes whole units (heads, channels), so the refit applies; else zeroes weights
    searches: bool = False  # bonsai's sub-model search: iterations, sub-models, --dry-run's estimate
    calibration: dict = field(default_factory=dict)  # its own calibration defaults (the paper's), unless set
    checks_units: bool = True  # --units applies (structured methods)
    step: Callable | None = None  # one-shot methods: step(run, windows, block_params, progress) -> report details

    def load_runner(self) -> Callable[..., Any]:
        from importlib import import_module

        module, name = self.runner.split(":")
        return getattr(import_module(module), name)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, runner: str, summary: str, structured: bool, searches: bool = False,
                    calibration: dict | None = None, step: Callable | None = None) -> Callable[[type], type]:
    """Class decorator for a method's settings dataclass: registers `name` (several names may share one class)."""

    def deco(settings: type) -> type:
        METHODS[name] = MethodSpec(name, settings, runner, summary, structured, searches, dict(calibration or {}),
                                   checks_units=structured, step=step)
        return settings
    return deco


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise BonsaiError(f"unknown method {name!r}: choose from {', '.join(METHODS)}") from None


def option(default: Any, help: str, *flags: str, panel: str | None = None, factory: Callable | None = None,
           **typer_kwargs) -> Field:
    """A settings field that is also a `bonsai prune` option: its help, its flags where they are not the field's
    name with dashes (`--p-iter` for p_iter), and its --help panel where it is not its settings class's PANEL."""
    meta = {"help": help, "flags": flags, "panel": panel, "typer": typer_kwargs}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def option_fields(settings: type) -> list[Field]:
    """The fields of a settings class that are command-line options (those declared with `option`)."""
    return [f for f in fields(settings) if "help" in f.metadata]
