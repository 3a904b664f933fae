"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class BonsaiError(Exception):
    """An error caused by the user's input or environment, not by a bug in bonsai."""

    exit_code = 2
