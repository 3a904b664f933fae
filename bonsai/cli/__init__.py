"""The `bonsai` command line: one module per group of commands (prune, finetune, evaluate, export, info), all
registered on the one typer app of `bonsai.cli.app` (imported first: it sets the thread count before torch)."""

from __future__ import annotations

import sys

import typer

# the commands register on the app as their modules load, in the order --help lists them
from bonsai.cli import prune, finetune, evaluate, export, info  # noqa: F401, I001
from bonsai.cli.app import app
from bonsai.errors import BonsaiError


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
