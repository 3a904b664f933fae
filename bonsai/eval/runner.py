"""`bonsai eval` for perplexity targets: load, window, evaluate, summarise."""

from __future__ import annotations

from bonsai.errors import BonsaiError
from bonsai.eval.perplexity import window_nll
from bonsai.progress import make_progress

DEFAULT_SEQLEN = 2048


def default_seqlen(config, requested: int | None) -> int:
    """2048 capped at the model's positions; never silently the (possibly huge) max itself."""
    limit = getattr(config, "max_position_embeddings", None) or DEFAULT_SEQLEN
    if requested is None:
        return min(DEFAULT_SEQLEN, limit)
    if requested < 2:
        raise BonsaiError(f"--seqlen must be at least 2 (got {requested})")
    if requested > limit:
        raise BonsaiError(f"--seqlen {requested} exceeds the model's {limit} positions")
    return requested


def run_perplexity(target: str, model_name: str, seqlen: int | None = None, batch_size: int = 1,
                   split: str = "test", max_windows: int | None = None, dtype: str = "auto",
                   device: str = "auto", trust_remote_code: bool = False, model=None, tokenizer=None,
                   bos: str = "auto") -> dict:
    from bonsai.data import bos_record, eval_windows, resolve_bos
    from bonsai.models.loading import load_model, load_tokenizer

    if seqlen is not None and seqlen < 2:
        raise BonsaiError(f"--seqlen must be at least 2 (got {seqlen})")
    if tokenizer is None:
        tokenizer = load_tokenizer(model_name, trust_remote_code)
    if model is None:
        model = load_model(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    seqlen = default_seqlen(model.config, seqlen)
    windows, data = eval_windows(tokenizer, target, seqlen, split=split, max_windows=max_windows,
                                 bos=resolve_bos(tokenizer, bos))
    with make_progress(transient=True) as progress:
        task = progress.add_task(f"{data.name} ppl", total=windows.shape[0], info="")
        result = window_nll(model, windows, batch_size, on_batch=lambda n: progress.advance(task, n))
    return {
        "ppl": result.ppl,
        "loss": result.loss,
        "dataset": data.name,
        "split": data.split,
        "seqlen": seqlen,
        "tokens": int(windows.numel()),
        "windows": int(windows.shape[0]),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "params": int(sum(p.numel() for p in model.parameters())),
        "model": model_name,
        "bos": bos_record(tokenizer, bos),
    }
