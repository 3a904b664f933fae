"""Progress and messages shared by the commands: rich bars on a terminal, plain lines in a log.

Rich sizes its output to the terminal; written to a file, a pipe, CI or `nohup` it falls back to 80 columns and
cuts every table cell ("iterat… sparsi…") and its live bars print nothing until they end. When stderr / stdout
is not a terminal, tables render at a width that holds them (`COLUMNS`, else 200) and progress is a line per
task when it starts, every tenth of the way (or after ten quiet minutes) and when it ends: a log that reads
well and never hides numbers.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _width(stream) -> int | None:
    """None on a terminal (rich measures it); otherwise `COLUMNS` or a width that fits every table."""
    if stream.isatty():
        return None
    return int(os.environ.get("COLUMNS", "0") or 0) or 200


console = Console(stderr=True, width=_width(sys.stderr))  # progress and messages
out_console = Console(width=_width(sys.stdout))  # results (tables), so that stdout can be piped


class PlainProgress:
    """The part of rich's `Progress` the commands use, written as plain lines (see module doc)."""

    STEP = 0.1  # a line every tenth of a task
    QUIET_SECONDS = 600  # and at least every ten minutes

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.tasks: dict[int, dict] = {}
        self._next = 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        task = self._next
        self._next += 1
        now = time.time()
        self.tasks[task] = {"description": description, "total": total, "completed": completed, "start": now,
                            "said": now, "said_share": -1.0, "info": fields.get("info", "")}
        self._say(task, "started")
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + advance)

    def update(self, task: int, completed: float | None = None, total: float | None = None, **fields) -> None:
        t = self.tasks[task]
        if total is not None:
            t["total"] = total
        if "info" in fields:
            t["info"] = fields["info"]
        if completed is None:
            return
        t["completed"] = completed
        share = completed / t["total"] if t["total"] else 0.0
        now = time.time()
        if share >= 1.0 or share >= t["said_share"] + self.STEP or now - t["said"] >= self.QUIET_SECONDS:
            self._say(task, "done" if share >= 1.0 else None)

    def remove_task(self, task: int) -> None:
        t = self.tasks[task]
        if t["total"] and t["completed"] < t["total"]:  # stopped early (an adaptive round): say where it stopped
            self._say(task, "stopped")
        del self.tasks[task]

    def _say(self, task: int, state: str | None) -> None:
        t = self.tasks[task]
        now = time.time()
        share = t["completed"] / t["total"] if t["total"] else 0.0
        t["said"], t["said_share"] = now, share
        if self.disable:
            return
        count = f"{t['completed']:g}/{t['total']:g}" if t["total"] else f"{t['completed']:g}"
        elapsed = now - t["start"]
        eta = ""
        if t["total"] and 0 < share < 1:
            eta = f", eta {_clock(elapsed / share - elapsed)}"
        info = f" {t['info']}" if t["info"] else ""
        label = f" {state}" if state else ""
        console.print(f"{t['description']}{label}: {count}{info} ({_clock(elapsed)}{eta})", highlight=False)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def make_progress(transient: bool = False, disable: bool = False) -> Progress | PlainProgress:
    if not console.is_terminal:
        return PlainProgress(disable=disable)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=transient, disable=disable,
    )
