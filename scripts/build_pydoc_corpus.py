#!/usr/bin/env python
"""Build a held-out text of another kind than the shipped corpora: technical prose, from the docstrings of
Python's standard library (PSF licence), so that models calibrated on Austen or the KJV can be tested on text
they never saw (the cross-text rows of docs/quality.md).

    python scripts/build_pydoc_corpus.py --out runs/texts     # writes pydoc-train.txt and pydoc-test.txt

Every public module of the standard library this Python has (a few with side effects left out), its docstring
and those of its public classes, functions and methods, one paragraph each, duplicates dropped; modules sorted by
name, every fifth to the test file. The text depends on the Python version that builds it (3.11 here).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip", "venv",
        "pydoc_data", "__main__", "__future__", "__hello__", "__phello__", "webbrowser", "pty", "tty", "getpass",
        "crypt", "nis", "spwd", "ossaudiodev", "msvcrt", "winreg", "winsound", "_winapi", "nt"}


def docs_of(module) -> list[str]:
    out = []
    for doc in [inspect.getdoc(module)] + [inspect.getdoc(obj) for name, obj in sorted(vars(module).items())
                                         if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
                                         and (inspect.isclass(obj) or inspect.isfunction(obj))]:
        if doc and len(doc) > 80:
            out.append(doc.strip())
    for name, cls in sorted(vars(module).items()):
        if inspect.isclass(cls) and not name.startswith("_") and getattr(cls, "__module__", None) == module.__name__:
            for mname, meth in sorted(vars(cls).items()):
                doc = inspect.getdoc(meth) if not mname.startswith("_") and callable(meth) else None
                if doc and len(doc) > 80:
                    out.append(doc.strip())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "runs" / "texts")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    seen, modules = set(), []
    for name in sorted(getattr(sys, "stdlib_module_names", ())):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except Exception:  # platform modules that do not exist here
            continue
        paragraphs = [d for d in docs_of(module) if not (d in seen or seen.add(d))]
        if paragraphs:
            modules.append((name, paragraphs))
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {"train": [], "test": []}
    for i, (_name, paragraphs) in enumerate(modules):
        parts["test" if i % 5 == 4 else "train"].append("\n\n".join(paragraphs))
    for split, texts in parts.items():
        path = args.out / f"pydoc-{split}.txt"
        path.write_text("\n\n".join(texts) + "\n")
        print(f"{path}: {len(texts)} modules, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
