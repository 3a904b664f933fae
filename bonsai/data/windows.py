"""Token windows for perplexity, calibration and training, cut the way the model family is run.

Families whose tokenizer puts a BOS token before every text (Gemma 1/2/3, LLaMA 1/2/3, Mistral) are only
ever run with it at position 0: Gemma-3-270M's perplexity on the same text is 36.5 with it and 155 without.
So every window starts with that token when the family expects it (`--bos auto`, the tokenizer's own
behaviour), followed by `seqlen - 1` text tokens; the BOS position is context only (no token predicts it).
Text is tokenised once per (tokenizer, source, split).
"""

from __future__ import annotations

import torch

from bonsai.data.sources import TextData, load_text
from bonsai.errors import BonsaiError

BOS_MODES = ("auto", "always", "never")
BOS_HELP = ("Start every window with the BOS token: auto (when the tokenizer adds one itself: Gemma, LLaMA, Mistral; "
            "not Qwen, Phi-2, SmolLM2) | always | never (no window gets one of its own; perplexity then tokenises the "
            "joined text once, as the published wikitext-2 protocol does).")

_CACHE: dict[tuple, torch.Tensor] = {}


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself starts an encoded text with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = _ids(tokenizer, "a", True)
    return bool(ids) and ids[0] == bos


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return ids[0] if ids and isinstance(ids[0], list) else ids


def resolve_bos(tokenizer, mode: str) -> int | None:
    """The token id every window starts with under `--bos mode`, or None for windows of text alone."""
    if mode not in BOS_MODES:
        raise BonsaiError(f"unknown --bos {mode!r}: choose from {', '.join(BOS_MODES)}")
    if mode == "never":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "always":
        if bos is None:
            raise BonsaiError("--bos always: this tokenizer has no BOS token (use --bos auto or never)")
        return int(bos)
    return int(bos) if adds_bos(tokenizer) else None


def bos_record(tokenizer, mode: str) -> dict:
    """What report.json and `bonsai eval --json` say about the windows' first token."""
    bos = resolve_bos(tokenizer, mode)
    token = None
    if bos is not None:
        convert = getattr(tokenizer, "convert_ids_to_tokens", None)
        token = convert(bos) if convert is not None else None
    return {"mode": mode, "token_id": bos, "token": token}


def tokenize_text(tokenizer, data: TextData, special: bool = False) -> torch.Tensor:
    """The joined text as one token sequence; `special`: with the tokenizer's own special tokens (one BOS at its
    start for families that add one)."""
    # with special tokens, what the tokenizer adds is part of the key (two tokenizers may share a path)
    added = tuple(_ids(tokenizer, "a", True)) if special else None
    text = data.text
    # the text itself is in the key: two local files of one name are two texts
    key = (getattr(tokenizer, "name_or_path", id(tokenizer)), len(tokenizer), data.name, data.split, len(text),
           hash(text), added)
    if key not in _CACHE:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the "longer than model_max_length" warning does not apply
        try:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=special)["input_ids"][0]
        finally:
            hf_logging.set_verbosity(verbosity)
        _CACHE[key] = ids
        from bonsai.runtime import release_memory

        release_memory()  # the tokenizer's working memory for a long text (400 MB for 3.6 MB of Austen)
    return _CACHE[key]


def prepare_text(tokenizer, target: str, split: str = "train", special: bool = False) -> None:
    """Tokenise a text now (it is cached): before the model is loaded, so that the tokenizer's working memory (400 MB
    for Austen's 3.6 MB) comes and goes while the process is small instead of adding to the model's peak. C4 is
    tokenised per document as windows are drawn, and is left alone."""
    for source in target.split(MIX):
        data = load_text(source.strip(), split)
        if data.name != "c4":
            tokenize_text(tokenizer, data, special=special)


def text_per_window(seqlen: int, bos: int | None) -> int:
    """Text tokens in a window of `seqlen` tokens."""
    if seqlen < 2:
        raise BonsaiError(f"--seqlen must be at least 2 (got {seqlen})")
    n = seqlen - (bos is not None)
    if n < 1:
        raise BonsaiError(f"--seqlen {seqlen} leaves no text after the BOS token")
    return n


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(n, k) text windows -> (n, k + 1) windows that start with `bos` (unchanged when bos is None)."""
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)


def consecutive_windows(ids: torch.Tensor, seqlen: int, bos: int | None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens over `ids` (remainder dropped), each starting with `bos`."""
    k = text_per_window(seqlen, bos)
    n = ids.numel() // k
    return with_bos(ids[: n * k].reshape(n, k), bos)


def eval_windows(tokenizer, target: str, seqlen: int, split: str = "test",
                 max_windows: int | None = None, bos: int | None = None) -> tuple[torch.Tensor, TextData]:
    """Non-overlapping `seqlen` windows of the joined split, remainder dropped (Wanda/SparseGPT protocol), each
    starting with `bos`; without one, the text is tokenised as that protocol does (with the tokenizer's own
    special tokens, so a family with a BOS has it at the start of the first window only)."""
    k = text_per_window(seqlen, bos)
    data = load_text(target, split)
    ids = tokenize_text(tokenizer, data, special=bos is None)
    n = ids.numel() // k
    if data.name == "c4":
        n = min(n, 256)  # Wanda's C4 protocol: the first 256 windows of the validation shard
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise BonsaiError(f"{target} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return consecutive_windows(ids[: n * k], seqlen, bos), data


MIX = "+"  # `--calib austen+kjv`: windows from several texts


def calibration_windows(tokenizer, target: str, n: int, seqlen: int, seed: int = 0,
                        bos: int | None = None) -> torch.Tensor:
    """`n` random windows of `seqlen` tokens from the training split (SparseGPT/Wanda calibration protocol), each
    `bos` (when given) followed by `seqlen - 1` text tokens.

    For C4, windows are random crops of random documents longer than the window's text, as in Wanda; otherwise
    random offsets into the joined split. A mixture `a+b+...` draws its windows from each text in turn (as evenly
    as `n` allows), each text with its own seeded draw.
    """
    if n < 1:
        raise BonsaiError(f"need at least one calibration sample (got {n})")
    sources = [t.strip() for t in target.split(MIX) if t.strip()]
    if len(sources) > 1:
        counts = [n // len(sources) + (i < n % len(sources)) for i in range(len(sources))]
        parts = [calibration_windows(tokenizer, src, c, seqlen, seed=seed * 1009 + i, bos=bos)
                 for i, (src, c) in enumerate(zip(sources, counts, strict=True)) if c]
        order = [(j, i) for j in range(max(counts)) for i in range(len(parts)) if j < len(parts[i])]
        return torch.stack([parts[i][j] for j, i in order])  # interleaved: every batch sees every text
    k = text_per_window(seqlen, bos)
    data = load_text(target, "train")
    g = torch.Generator().manual_seed(seed)
    if data.name == "c4":
        windows = []
        for _ in range(200 * n):
            doc = data.documents[int(torch.randint(len(data.documents), (1,), generator=g))]
            ids = tokenizer(doc, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
            if ids.numel() > k:
                start = int(torch.randint(ids.numel() - k, (1,), generator=g))
                windows.append(ids[start:start + k])
                if len(windows) == n:
                    return with_bos(torch.stack(windows), bos)
        raise BonsaiError(f"could not find {n} C4 documents longer than {k} tokens")
    ids = tokenize_text(tokenizer, data)
    if ids.numel() <= k:
        raise BonsaiError(f"{target} has {ids.numel()} tokens, too few for calibration windows of {seqlen}")
    starts = torch.randint(0, ids.numel() - k, (n,), generator=g)
    return with_bos(torch.stack([ids[s:s + k] for s in starts.tolist()]), bos)
