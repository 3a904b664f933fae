"""One run per output folder: a lock file beside the folder, held with flock for the life of the process.

The lock sits beside `OUT` (`.OUT.lock` in its parent), not inside it, because `--force` deletes the folder
and the final save replaces it by a rename. The kernel drops a flock when its process dies, however it dies,
so a lock left by a killed run never blocks the resume; the pid and command written into the file only
serve the error message of a second run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from bonsai.errors import BonsaiError


class RunLock:
    def __init__(self, out: str | Path):
        out = Path(out).resolve()
        self.path = out.parent / f".{out.name}.lock"
        self.out = out
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _describe(fd)
                os.close(fd)
                raise BonsaiError(f"another bonsai run{holder} is writing {self.out}; wait for it to finish or stop "
                                  "it, or choose another --out") from None
            try:  # the file we locked must still be the one at the path (a finishing run may have removed it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                                 "command": " ".join(sys.argv[1:])[:500]}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlink while still holding it: see the inode check above
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f" (pid {info['pid']} on {info['host']}, started {time.strftime('%H:%M', time.localtime(info['started']))})"
    except (ValueError, KeyError, TypeError, OSError):
        return ""


def main_process() -> bool:
    """Only the first process of a multi-process run takes the lock (they share one --out)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
