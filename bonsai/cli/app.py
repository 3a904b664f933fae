"""The typer application every `bonsai` command registers on, and what the commands share."""

from __future__ import annotations

from pathlib import Path

from bonsai.runtime import configure_threads

configure_threads()  # before torch is imported anywhere

import typer  # noqa: E402



app = typer.Typer(
    help="Structured pruning of LLMs with forward passes only (Bonsai). Run `bonsai COMMAND --help`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)


# prune --help panels of the options that are not settings (the settings bring their own)
RUN = 'The run'


DEVICES = 'Devices and resume'


def option(panel: str, *args, **kwargs):
    """A typer option shown under `panel` in --help (prune's options grouped by what they belong to)."""
    return typer.Option(*args, rich_help_panel=panel, **kwargs)


MODEL_HELP = "Model folder, Hugging Face id, or alias (see `bonsai models`; `tiny` is the shipped model)."


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def json_line(record: dict) -> None:
    """One machine-readable line on stdout (`--log-json`), whatever else is quiet."""
    import json

    print(json.dumps(record, default=str), flush=True)


def locked(out: Path):
    """One run per output folder (see bonsai.runlock); other processes of a multi-process run share it."""
    import contextlib

    from bonsai.runlock import RunLock, main_process

    return RunLock(out) if main_process() else contextlib.nullcontext()
