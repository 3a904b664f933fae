"""`bonsai bench`: end-to-end latency and generation throughput of a pruned model against its parent.

Both models are loaded once and measured alternately (model, baseline, model, ...) after a warm-up, with
CUDA synchronised around each timing, and the median of the repeats is reported; alternating keeps
clock and thermal drift from favouring either side.
"""

from __future__ import annotations

import statistics
import time

import torch

from bonsai.errors import BonsaiError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops_per_token(model, seqlen: int) -> float:
    """2 x (block + LM-head weights), plus attention scores and mixing over the full window (4 * seqlen * q width),
    as a dense kernel computes them (biases and norms ignored)."""
    from bonsai.adapters import get_adapter

    adapter = get_adapter(model)
    flops = 2.0 * adapter.block_parameters() + 2.0 * model.get_output_embeddings().weight.numel()
    for i in range(adapter.num_layers):
        att = adapter.attention(i)
        flops += 4.0 * seqlen * att.units * att.unit_width  # query rows (qkv_proj may be fused)
    return flops


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


def to_semi_structured(model) -> int:
    """Swap exactly 2:4-sparse block linears to PyTorch's semi-structured sparse kernels; returns how many."""
    from torch.sparse import to_sparse_semi_structured

    from bonsai.adapters import get_adapter
    from bonsai.engine.blocks import block_linears

    adapter = get_adapter(model)
    n = 0
    for block in adapter.layers():
        for lin in block_linears(block, adapter.linear_names).values():
            w = lin.weight.detach()
            if w.shape[1] % 4 == 0 and ((w == 0).view(w.shape[0], -1, 4).sum(2) >= 2).all():
                lin.weight = torch.nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
                n += 1
    return n


def semi_structured_supported(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the 2:4 kernels can run here, else the reason in words."""
    if device.type != "cuda":
        return "semi-structured sparse kernels need an NVIDIA GPU; the 2:4 model is measured as a dense model"
    major, _ = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"semi-structured sparse kernels need compute capability 8.0+ (this GPU: {major}.x); measured dense"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"semi-structured sparse kernels need float16/bfloat16 (got {dtype}); measured dense"
    return None


@torch.no_grad()
def _time_forward(model, ids: torch.Tensor) -> float:
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    model(ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def _time_generate(model, prompt: torch.Tensor, tokens: int) -> float:
    device = prompt.device
    _sync(device)
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
                   do_sample=False, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - start


def run_bench(model_name: str, baseline_name: str, seqlen: int | None, batch_sizes: list[int], generate_tokens: int,
              repeats: int, dtype: str, device: str, sparse_kernels: bool = False, warmup: int = 2,
              trust_remote_code: bool = False, progress=None) -> dict:
    from bonsai.eval.runner import default_seqlen
    from bonsai.models.loading import load_model, load_tokenizer
    from bonsai.runtime import resolve_device

    if repeats < 1 or any(b < 1 for b in batch_sizes) or generate_tokens < 0:
        raise BonsaiError("--repeats and --batch-sizes must be positive and --generate-tokens >= 0")
    if load_tokenizer(model_name, trust_remote_code).get_vocab() != load_tokenizer(baseline_name, trust_remote_code).get_vocab():
        raise BonsaiError(f"{model_name} and the baseline {baseline_name} use different tokenizers; "
                          "compare a pruned model with its own parent")
    target = resolve_device(device)
    models = {"model": load_model(model_name, dtype=dtype, device=str(target), trust_remote_code=trust_remote_code),
              "baseline": load_model(baseline_name, dtype=dtype, device=str(target), trust_remote_code=trust_remote_code)}
    seqlen = min(default_seqlen(m.config, seqlen) for m in models.values())
    mdtype = next(models["model"].parameters()).dtype
    notes = []
    info = {k: {"name": n, "params": int(sum(p.numel() for p in m.parameters())), "bytes": param_bytes(m),
                "flops_per_token": forward_flops_per_token(m, seqlen)}
            for (k, m), n in zip(models.items(), (model_name, baseline_name), strict=True)}
    if sparse_kernels:
        reason = semi_structured_supported(target, mdtype)
        if reason is None:
            converted = {k: to_semi_structured(m) for k, m in models.items()}
            notes.append(f"semi-structured 2:4 kernels on {converted} linears")
        else:
            notes.append(reason)
    vocab = min(m.get_output_embeddings().weight.shape[0] for m in models.values())
    g = torch.Generator().manual_seed(0)
    results = []
    total = len(batch_sizes) * (warmup + repeats) * (2 if generate_tokens else 1)
    task = progress.add_task("bench", total=total, info="") if progress else None
    for b in batch_sizes:
        ids = torch.randint(0, vocab, (b, seqlen), generator=g).to(target)
        times: dict[str, list[float]] = {"model": [], "baseline": []}
        for r in range(warmup + repeats):
            for k, m in models.items():
                t = _time_forward(m, ids)
                if r >= warmup:
                    times[k].append(t)
            if task is not None:
                progress.advance(task)
        row = {"batch_size": b, "seqlen": seqlen,
               "forward_seconds_model": statistics.median(times["model"]),
               "forward_seconds_baseline": statistics.median(times["baseline"])}
        row["speedup"] = row["forward_seconds_baseline"] / row["forward_seconds_model"]
        if generate_tokens:
            prompt = ids[:, :32]
            gen: dict[str, list[float]] = {"model": [], "baseline": []}
            for r in range(warmup + repeats):
                for k, m in models.items():
                    t = _time_generate(m, prompt, generate_tokens)
                    if r >= warmup:
                        gen[k].append(t)
                if task is not None:
                    progress.advance(task)
            row["generate_tokens_per_second_model"] = b * generate_tokens / statistics.median(gen["model"])
            row["generate_tokens_per_second_baseline"] = b * generate_tokens / statistics.median(gen["baseline"])
            row["generate_speedup"] = row["generate_tokens_per_second_model"] / row["generate_tokens_per_second_baseline"]
        if target.type == "cuda":
            for k, m in models.items():
                torch.cuda.reset_peak_memory_stats(target)
                _time_forward(m, ids)
                row[f"peak_memory_bytes_{k}"] = int(torch.cuda.max_memory_allocated(target))
        results.append(row)
    return {
        "device": str(target), "dtype": str(mdtype).replace("torch.", ""), "repeats": repeats, "warmup": warmup,
        "generate_tokens": generate_tokens, "models": info,
        "param_ratio": info["model"]["params"] / info["baseline"]["params"],
        "flop_ratio": info["model"]["flops_per_token"] / info["baseline"]["flops_per_token"],
        "results": results,
        "speedup": {f"forward_b{r['batch_size']}": r["speedup"] for r in results} | {
            f"generate_b{r['batch_size']}": r["generate_speedup"] for r in results if "generate_speedup" in r},
        "notes": notes,
    }
