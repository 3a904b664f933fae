"""One rule for the output folder of every run (prune, each baseline, finetune), so that rerunning a command does
the same thing whichever command it is:

- the folder does not exist: a new run;
- it holds a run of this kind (its checkpoint, or its finished result) with the same settings: the run resumes
  from its last checkpoint, or reports the finished result; settings added since that run was checkpointed
  count as what the version that wrote it did (`legacy`);
- it holds a run with other settings: stop, naming the settings that differ;
- it holds anything else: stop, and say that --force replaces it;
- `--force`: a new run; the old folder is removed only once the model and the text have been checked
  (`RunFolder.clear_replaced`), so a mistyped command loses nothing.

Writes inside the folder are atomic (`bonsai.io`); one process at a time owns it (`bonsai.runlock`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bonsai.errors import BonsaiError


@dataclass
class RunFolder:
    """What a run found in its output folder: whether it resumes, and whether the old folder goes first."""

    out: Path
    resuming: bool = False
    replace: bool = False

    def clear_replaced(self, barrier: Callable[[], None] = lambda: None, is_main: bool = True) -> None:
        """`--force`: remove the old folder, now that nothing can fail before the new run writes. `barrier`: the
        processes of a distributed run all pass it before and after (every process has looked first)."""
        if not self.replace:
            return
        barrier()
        if is_main and self.out.exists():
            shutil.rmtree(self.out)
        barrier()
        self.replace = False


def open_run_folder(out: str | Path, force: bool, fingerprint: dict, stored: Callable[[], dict | None],
                    legacy: dict | None = None, what: str = "bonsai run") -> RunFolder:
    """Apply the rule above. `stored()` gives the settings of the run the folder holds (its fingerprint), or None
    when it holds no run of this kind; it is only called when the folder exists and `force` is off."""
    out = Path(out)
    if not out.exists():
        return RunFolder(out)
    if force:
        return RunFolder(out, replace=True)
    saved = stored()
    if saved is None:
        raise BonsaiError(f"output folder {out} already exists and holds no {what} to resume; pass --force to "
                          "replace it or choose another --out")
    check_same_settings(out, saved, fingerprint, legacy, what)
    return RunFolder(out, resuming=True)


def check_same_settings(out: Path, saved: dict, fingerprint: dict, legacy: dict | None = None,
                        what: str = "bonsai run") -> None:
    """Stop unless the settings a folder's run was started with are this run's (see `open_run_folder`)."""
    saved = {**{k: v for k, v in (legacy or {}).items() if k in fingerprint and k not in saved}, **saved}
    if saved != fingerprint:
        diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise BonsaiError(f"{out} holds a {what} with other settings ({', '.join(diff)}); pass --force to replace "
                          "it or choose another --out")
