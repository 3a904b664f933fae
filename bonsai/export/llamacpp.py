"""Running a GGUF file in llama.cpp itself (through llama-cpp-python), to check an export and measure it.

`bonsai eval TARGET --model FILE.gguf` tokenises the text with the file's own tokenizer (llama.cpp's), cuts
the same non-overlapping windows as for a Hugging Face model, and sums the next-token NLL from llama.cpp's
logits in float64: the same protocol, so the two perplexities compare directly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from bonsai.errors import BonsaiError


def is_gguf(path: str) -> bool:
    return str(path).endswith(".gguf")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise BonsaiError("running a GGUF file needs llama-cpp-python: pip install 'bonsai-prune[llamacpp]' "
                          "(it builds llama.cpp from source, several minutes)") from None
    return llama_cpp


class GGUFModel:
    """A GGUF file loaded in llama.cpp: tokenisation and full next-token logits for token windows."""

    def __init__(self, path: str | Path, n_ctx: int = 2048, threads: int | None = None):
        llama_cpp = _llama_cpp()
        path = Path(path)
        if not path.is_file():
            raise BonsaiError(f"GGUF file not found: {path}")
        threads = threads or max(1, min(os.cpu_count() or 1, 8))
        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                                       n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
        except (ValueError, RuntimeError) as exc:
            raise BonsaiError(f"llama.cpp cannot load {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        self.path = path
        self.n_ctx = n_ctx

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), vocab) float32 logits of every position, from a fresh context."""
        if len(tokens) > self.n_ctx:
            raise BonsaiError(f"a window of {len(tokens)} tokens exceeds the llama.cpp context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def window_nll(self, windows: torch.Tensor, on_window=None) -> tuple[float, int]:
        """Summed next-token NLL (float64) over windows, and the number of predictions."""
        total, count = 0.0, 0
        for row in windows.tolist():
            logits = self.logits(row).astype(np.float64)
            logz = np.logaddexp.reduce(logits[:-1], axis=1)
            total += float((logz - logits[np.arange(len(row) - 1), row[1:]]).sum())
            count += len(row) - 1
            if on_window is not None:
                on_window()
        return total, count

    def close(self) -> None:
        """Free llama.cpp's model and context now, in order, instead of whenever the garbage collector runs."""
        if self.llm is not None:
            self.llm.close()  # llama-cpp-python >= 0.3 (the extra's floor) frees context then model
            self.llm = None

    def __enter__(self) -> "GGUFModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GGUFTokenizer:
    """Just enough of a Hugging Face tokenizer for bonsai's windowing, tokenising through llama.cpp."""

    def __init__(self, model: GGUFModel):
        self.model = model
        self.name_or_path = str(model.path)

    def __len__(self) -> int:
        return self.model.n_vocab

    @property
    def bos_token_id(self) -> int | None:
        bos = int(self.model.llm.token_bos())
        return bos if bos >= 0 else None

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = False) -> dict:
        ids = self.model.tokenize(text, add_special=add_special_tokens)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def gguf_metadata(path: str) -> tuple[dict, int]:
    """The file's scalar metadata and its number of weights, read without llama.cpp (gguf package)."""
    try:
        import gguf
    except ImportError:
        raise BonsaiError("reading a GGUF file needs the gguf package: pip install gguf") from None
    if not Path(path).is_file():
        raise BonsaiError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise BonsaiError(f"{path} is not a readable GGUF file: {exc}") from None
    meta = {}
    for key, field in reader.fields.items():
        if len(field.types) == 1 and field.types[0] != gguf.GGUFValueType.ARRAY:
            meta[key] = field.contents()
    return meta, int(sum(int(t.n_elements) for t in reader.tensors))


def gguf_context_length(path: str) -> int:
    meta, _ = gguf_metadata(path)
    return int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", 2048))


def gguf_perplexity(target: str, path: str, seqlen: int = 2048, split: str = "test",
                    max_windows: int | None = None, bos: str = "auto") -> dict:
    from bonsai.data import bos_record, eval_windows, resolve_bos
    from bonsai.progress import make_progress

    _, params = gguf_metadata(path)
    with GGUFModel(path, n_ctx=seqlen) as model:
        tokenizer = GGUFTokenizer(model)
        windows, data = eval_windows(tokenizer, target, seqlen, split=split, max_windows=max_windows,
                                     bos=resolve_bos(tokenizer, bos))
        record = bos_record(tokenizer, bos)
        with make_progress(transient=True) as progress:
            task = progress.add_task(f"{data.name} ppl (llama.cpp)", total=windows.shape[0], info="")
            nll, count = model.window_nll(windows, on_window=lambda: progress.advance(task))
    loss = nll / count
    return {"ppl": math.exp(loss) if math.isfinite(loss) else float("inf"), "loss": loss, "dataset": data.name,
            "split": data.split, "seqlen": seqlen, "tokens": int(windows.numel()), "windows": int(windows.shape[0]),
            "dtype": "gguf", "params": params, "model": path, "engine": "llama.cpp", "bos": record}
