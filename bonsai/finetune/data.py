"""Training and held-out windows for finetuning.

Named corpora train on their train split and report perplexity on their held-out split (wikitext2 and c4:
validation; kjv: test). A local file has one text, so its last windows are held out instead.
"""

from __future__ import annotations

import torch

from bonsai.data import consecutive_windows, load_text, tokenize_text
from bonsai.data.sources import ALIASES
from bonsai.data.windows import text_per_window
from bonsai.errors import BonsaiError

HELD_OUT_SPLIT = {"wikitext2": "validation", "c4": "validation", "kjv": "test", "austen": "test"}
C4_DEFAULT_SAMPLES = 30_000  # the paper's 30k sequences; the C4 shard itself holds far more


def _c4_train_ids(tokenizer, text_tokens: int, samples: int) -> torch.Tensor:
    """Tokenise C4 documents in order only until there are enough tokens (the shard has ~150M)."""
    data = load_text("c4", "train")
    need, parts, have = samples * text_tokens, [], 0
    for start in range(0, len(data.documents), 2000):
        text = data.joiner.join(data.documents[start:start + 2000])
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
        parts.append(ids)
        have += ids.numel()
        if have >= need:
            break
    return torch.cat(parts)


def finetune_windows(tokenizer, source: str, seqlen: int, samples: int | None, eval_windows: int,
                     seed: int, bos: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train windows, held-out windows, a description of where the held-out text comes from), each window
    starting with `bos` when given (`bonsai.data.windows`).

    With `samples`, a seeded random subset of that many training windows is used (all when None).
    """
    k = text_per_window(seqlen, bos)
    name = ALIASES.get(source, source)
    if name in HELD_OUT_SPLIT:
        if name == "c4":
            train_ids = _c4_train_ids(tokenizer, k, samples or C4_DEFAULT_SAMPLES)
        else:
            train_ids = tokenize_text(tokenizer, load_text(name, "train"))
        train = consecutive_windows(train_ids, seqlen, bos)
        held = consecutive_windows(tokenize_text(tokenizer, load_text(name, HELD_OUT_SPLIT[name])), seqlen,
                                   bos)[:eval_windows]
        where = f"{name} {HELD_OUT_SPLIT[name]}"
    else:
        all_windows = consecutive_windows(tokenize_text(tokenizer, load_text(source, "train")), seqlen, bos)
        n_held = min(eval_windows, max(1, all_windows.shape[0] // 10))
        train, held = all_windows[:-n_held], all_windows[-n_held:]
        where = f"last {n_held} windows of {source}"
    if train.shape[0] == 0 or held.shape[0] == 0:
        raise BonsaiError(f"{source} is too short for training and held-out windows of {seqlen} tokens")
    if samples is not None:
        if samples < 1:
            raise BonsaiError(f"--samples must be at least 1 (got {samples})")
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(train.shape[0], generator=g)[: min(samples, train.shape[0])].sort().values
        train = train[pick]
    return train.contiguous(), held.contiguous(), where
