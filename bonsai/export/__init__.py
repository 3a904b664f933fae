"""`bonsai export`: a pruned (or any supported) model written in a serving format, one writer per format.

Writers register by format name; each takes the loaded model and tokenizer and writes one file atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bonsai.errors import BonsaiError

WRITERS: dict[str, Callable] = {}


def register_writer(name: str):
    def deco(fn: Callable) -> Callable:
        WRITERS[name] = fn
        return fn
    return deco


def export_model(model_path: str, fmt: str, out: str | Path, dtype: str, force: bool = False,
                 trust_remote_code: bool = False, allow_fallback: bool = False) -> dict:
    """Load `model_path` and write it as `fmt` to `out`; returns the writer's report."""
    from bonsai.export import gguf as _gguf  # noqa: F401  (registration)

    if fmt not in WRITERS:
        raise BonsaiError(f"unknown export format {fmt!r}: choose from {', '.join(sorted(WRITERS))}")
    out = Path(out)
    if out.exists() and not force:
        raise BonsaiError(f"{out} already exists; pass --force to replace it")
    if out.is_dir():
        raise BonsaiError(f"{out} is a folder; --out must name a file")
    from bonsai.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_model(model_path, dtype="float32", device="cpu", trust_remote_code=trust_remote_code)
    return WRITERS[fmt](model, tokenizer, out, dtype, source=model_path, allow_fallback=allow_fallback)
