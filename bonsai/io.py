"""Atomic writers and checked readers for everything bonsai puts on disk.

A crash (or a full disk) never leaves a half-written file behind: every file goes to a temporary name in
the same folder and is renamed into place when complete. A damaged file is never read silently: the
readers turn a truncated or corrupt JSON/safetensors file into a `DamagedFile` error naming the file, and
the callers decide whether to recompute the part it held or to refuse with a one-line way out.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bonsai.errors import BonsaiError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class DamagedFile(BonsaiError):
    """A checkpoint or model file that exists but cannot be read back."""

    def __init__(self, path: str | Path, reason: str, hint: str = ""):
        self.path = Path(path)
        super().__init__(f"damaged file {path} ({reason})" + (f": {hint}" if hint else ""))


class DiskFull(BonsaiError):
    """The device ran out of space while writing; what was there before is intact."""


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT while writing `path` into one line that says what survives."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the device while writing {path}; free space and run the same "
                           "command again (the previous checkpoint and any finished output are intact)") from None
        raise


def _write_atomic(path: Path, write: Callable[[str], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; the finished file gets the usual permissions
    try:
        with disk_errors(path):
            write(tmp)
            os.replace(tmp, path)
    except BaseException:  # a kill, Ctrl-C or full disk mid-write leaves only the old file
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    return _write_atomic(Path(path), write)


CHECKSUM_KEY = "bonsai.sha256"


def tensors_checksum(tensors: dict) -> str:
    """sha256 over names and raw bytes: catches what a structurally valid but corrupted file hides."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        if t.numel() == 0:
            continue
        if t.stride(0) != 1:  # broadcast or strided: hash the values as they are saved
            t = torch.empty(t.numel(), dtype=t.dtype).copy_(t)
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def write_safetensors_atomic(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None,
                             checksum: bool = True) -> Path:
    """Checkpoints carry a checksum of their tensors in the header, verified by `read_safetensors`."""
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    if checksum:
        meta[CHECKSUM_KEY] = tensors_checksum(tensors)

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=meta or None)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return _write_atomic(Path(path), write)


def read_json(path: str | Path, hint: str = "") -> Any:
    """The JSON in `path`; a truncated or garbled file raises `DamagedFile` (a missing one FileNotFoundError)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DamagedFile(path, f"not valid JSON: {exc}", hint) from None


def read_safetensors(path: str | Path, hint: str = "") -> dict:
    """All tensors of `path`; a truncated or corrupt file (or one whose checksum no longer matches) raises
    `DamagedFile`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DamagedFile(path, reason, hint) from None
    if CHECKSUM_KEY in meta and tensors_checksum(tensors) != meta[CHECKSUM_KEY]:
        raise DamagedFile(path, "checksum mismatch", hint)
    return tensors


def _default(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
