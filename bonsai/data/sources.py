"""Text sources: hub datasets (wikitext2, c4), the shipped corpora (`kjv`, alias `tiny`; `austen`), local files.

Hub datasets are read from the local cache when the Hub cannot be reached; if they are not cached the
user is told at once (instead of `datasets` retrying for ~20 s and printing a traceback).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from bonsai.errors import BonsaiError
from bonsai.runtime import hub_reachable

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Public-domain corpora in bonsai/assets/NAME/{train,test}.txt.gz, split by chapter (see their README.md).
SHIPPED = ("kjv", "austen")
DATASETS = ("wikitext2", "c4", *SHIPPED)
ALIASES = {"tiny": "kjv", "wikitext": "wikitext2", "wikitext-2": "wikitext2"}

# The shards used by Wanda/SparseGPT for C4.
C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


@dataclass
class TextData:
    """Documents of one split of a source; `joiner` is how the evaluation protocol concatenates them."""

    name: str
    split: str
    documents: list[str]
    joiner: str = "\n\n"

    @property
    def text(self) -> str:
        return self.joiner.join(self.documents)


def is_local_file(target: str) -> bool:
    return target.endswith((".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".json")) or Path(target).exists()


def _open_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _local(target: str) -> TextData:
    path = Path(target).expanduser()
    if not path.is_file():
        raise BonsaiError(f"data file not found: {target}")
    raw = _open_text(path)
    if ".jsonl" in path.name:
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise BonsaiError(f"{target}:{n}: each .jsonl line must be an object with a 'text' field") from None
    else:
        docs = [raw]
    if not any(d.strip() for d in docs):
        raise BonsaiError(f"data file {target} is empty")
    return TextData(name=path.name, split="file", documents=docs)


def _hub_dataset(path: str, name: str | None, split: str, data_files: dict | None, label: str):
    import datasets
    import huggingface_hub.constants as hub_constants

    online = hub_reachable()
    previous = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if not online:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        datasets.logging.set_verbosity_error()
        return datasets.load_dataset(path, name, split=split, data_files=data_files)
    except Exception as exc:  # datasets raises many types for "not cached"/"no network"
        if not online:
            raise BonsaiError(
                f"{label} is not in the local datasets cache and the Hugging Face Hub cannot be reached; "
                "pass a local text file instead (a .txt, .txt.gz or .jsonl path), or use the shipped corpus 'kjv'"
            ) from None
        raise BonsaiError(f"cannot load {label}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = previous


def load_text(target: str, split: str = "test") -> TextData:
    """Documents for `target` (a dataset name or a local file). `split` is test/train/validation."""
    target = ALIASES.get(target, target)
    if target in SHIPPED:
        part = "train" if split == "train" else "test"
        return TextData(name=target, split=part, documents=_open_text(ASSETS / target / f"{part}.txt.gz").split("\n\n"))
    if target == "wikitext2":
        ds = _hub_dataset("wikitext", "wikitext-2-raw-v1", split, None, "wikitext2 (wikitext-2-raw-v1)")
        return TextData(name="wikitext2", split=split, documents=list(ds["text"]), joiner="\n\n")
    if target == "c4":
        part = "train" if split == "train" else "validation"
        ds = _hub_dataset("allenai/c4", None, part, {part: C4_FILES[part]}, f"c4 ({C4_FILES[part]})")
        docs = list(ds["text"][:1100]) if part == "validation" else list(ds["text"])
        return TextData(name="c4", split=part, documents=docs, joiner=" ")
    if is_local_file(target):
        return _local(target)
    raise BonsaiError(f"unknown data source {target!r}: use one of {', '.join(DATASETS)} or a local .txt/.jsonl file")
