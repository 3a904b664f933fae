"""Simulated crashes, for the tests that kill a long run and resume it.

Each crash point is named by an environment variable; where it is set, the process exits at that point the way a
killed one does (`os._exit`: no cleanup, no `finally`, status CRASH_STATUS), right after the checkpoint the
resume will start from. Unset (every real run), a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
from collections.abc import Callable

CRASH_STATUS = 75
AFTER_EVALS = "BONSAI_ABORT_AFTER_EVALS"  # prune: after N sub-model evaluations of this process
AFTER_BLOCKS = "BONSAI_ABORT_AFTER_BLOCKS"  # BESA: after N blocks learned
AFTER_STEPS = "BONSAI_ABORT_AFTER_STEPS"  # finetune: after the checkpoint at step N
IN_RECONSTRUCTION = "BONSAI_ABORT_IN_RECONSTRUCTION"  # prune: "T:B", iteration T's refit after block B


def crash_after(point: str, done: int) -> None:
    """Exit like a crash once `done` reaches the count the test set for `point` (one of the AFTER_* names)."""
    limit = int(os.environ.get(point, "0") or 0)
    if limit and done >= limit:
        os._exit(CRASH_STATUS)


def reconstruction_crash(iteration: int) -> Callable[[int], None] | None:
    """A per-block hook for the refit of `iteration` (0-based) that crashes after the block IN_RECONSTRUCTION
    names, or None when no crash is asked for."""
    target = os.environ.get(IN_RECONSTRUCTION, "")
    if not target:
        return None
    at_iteration, at_block = (int(x) for x in target.split(":"))

    def hook(block: int) -> None:
        if iteration + 1 == at_iteration and block == at_block:
            os._exit(CRASH_STATUS)
    return hook
