"""Token windows for perplexity and calibration. Text is tokenised once per (tokenizer, source, split)."""

from __future__ import annotations

import torch

from bonsai.data.sources import TextData, load_text
from bonsai.errors import BonsaiError

_CACHE: dict[tuple, torch.Tensor] = {}


def tokenize_text(tokenizer, data: TextData) -> torch.Tensor:
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), data.name, data.split,
           len(data.documents))
    if key not in _CACHE:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "longer than model_max_length" warning does not apply
        try:
            ids = tokenizer(data.text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        finally:
            hf_logging.set_verbosity(verbosity)
        _CACHE[key] = ids
    return _CACHE[key]


def eval_windows(tokenizer, target: str, seqlen: int, split: str = "test",
                 max_windows: int | None = None) -> tuple[torch.Tensor, TextData]:
    """Non-overlapping `seqlen` windows of the joined split, remainder dropped (Wanda/SparseGPT protocol)."""
    if seqlen < 2:
        raise BonsaiError(f"--seqlen must be at least 2 (got {seqlen})")
    data = load_text(target, split)
    ids = tokenize_text(tokenizer, data)
    n = ids.numel() // seqlen
    if data.name == "c4":
        n = min(n, 256)  # Wanda's C4 protocol: the first 256 windows of the validation shard
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise BonsaiError(f"{target} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen), data


def calibration_windows(tokenizer, target: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`n` random `seqlen` windows from the training split (SparseGPT/Wanda calibration protocol).

    For C4, windows are random crops of random documents longer than `seqlen`, as in Wanda; otherwise
    random offsets into the joined split.
    """
    if seqlen < 2:
        raise BonsaiError(f"--seqlen must be at least 2 (got {seqlen})")
    if n < 1:
        raise BonsaiError(f"need at least one calibration sample (got {n})")
    data = load_text(target, "train")
    g = torch.Generator().manual_seed(seed)
    if data.name == "c4":
        windows = []
        for _ in range(200 * n):
            doc = data.documents[int(torch.randint(len(data.documents), (1,), generator=g))]
            ids = tokenizer(doc, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            if ids.numel() > seqlen:
                start = int(torch.randint(ids.numel() - seqlen, (1,), generator=g))
                windows.append(ids[start:start + seqlen])
                if len(windows) == n:
                    return torch.stack(windows)
        raise BonsaiError(f"could not find {n} C4 documents longer than {seqlen} tokens")
    ids = tokenize_text(tokenizer, data)
    if ids.numel() <= seqlen:
        raise BonsaiError(f"{target} has {ids.numel()} tokens, too few for calibration windows of {seqlen}")
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])
