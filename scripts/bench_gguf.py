#!/usr/bin/env python
"""Speed where pruned models are served: llama.cpp prompt and generation tokens/s, pruned vs parent, side by side.

A ~370M-parameter LLaMA shape with random weights (hidden 1024, 24 layers, 16 heads of 64, MLP 2816: compute
dominates on a CPU) is pruned to 50% of its block parameters, (a) with a per-layer plan shaped like Bonsai's
allocation on SmolLM2 (first and last layers kept widest, middle layers thinnest; `--plan report.json` takes
the fractions from a real `bonsai prune` report instead) and (b) uniformly, each with the widths left as the
plan gives them and rounded to `--width-multiples` (MLP channels a multiple of N, heads x 64 too: what
`bonsai prune --width-multiple N --head-multiple N/64` produces). Every model is exported with `bonsai
export` and measured alternately with the parent by `bonsai bench` (median of repeats); transformers' CPU
forward of one prompt is timed the same way (`--hf`). K-quants of widths that are not multiples of 256 go
through `--allow-fallback` and the report counts the block matrices that fell back.

    python scripts/bench_gguf.py --dtypes f16,q4_k_m --width-multiples 1,256 --prompt 256 --generate 64 \
        --repeats 5 --hf

`--hf-only` skips llama.cpp and times transformers' prefill and decoding on one device, e.g. the CUDA row at
7B shape (random weights; the parent and four pruned copies fit one 80 GB card in bf16):

    python scripts/bench_gguf.py --hf-only --shape llama-2-7b --device cuda --dtype bfloat16 \
        --width-multiples 1,256 --prompt 2048 --generate 128 --repeats 5 --json widths-cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def shaped_fractions(n: int, plan: str | None) -> tuple[list[float], list[float]]:
    """Kept fraction per layer for attention and MLP (before scaling to the 50% target)."""
    import numpy as np

    if plan:
        report = json.loads(Path(plan).read_text())
        last = report["iterations"][-1] if report.get("iterations") else report
        att, mlp = np.array(last["attention_units"], float), np.array(last["mlp_units"], float)
        att, mlp = att / max(att.max(), 1), mlp / max(mlp.max(), 1)
        src = np.linspace(0, 1, len(att))
        dst = np.linspace(0, 1, n)
        return list(np.interp(dst, src, att)), list(np.interp(dst, src, mlp))
    x = np.linspace(0, 1, n)
    shape = 0.35 + 0.65 * (np.abs(x - 0.5) * 2) ** 2  # U-shaped: wide at both ends, thin in the middle
    return list(np.clip(shape, 0.1, 1.0)), list(np.clip(shape, 0.1, 1.0))


def _rounded(n: float, multiple: int, full: int) -> int:
    """n rounded to a multiple (at least one multiple, at most the full width)."""
    if multiple <= 1:
        return max(1, min(full, round(n)))
    return max(multiple, min(full, multiple * round(n / multiple)))


SHAPE_370M = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)


def build(kind: str, plan: str | None, multiple: int = 1, seed: int = 0, shape: dict | None = None,
          device: str = "cpu", dtype=None):
    """The parent (random weights of `shape`, default the 370M shape) or a pruned copy of it, on `device`."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter

    torch.manual_seed(seed)
    cfg = LlamaConfig(**(shape or SHAPE_370M), tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(prev)
    if kind == "parent":
        return model
    adapter = get_adapter(model)
    n = cfg.num_hidden_layers
    heads, ff, head_dim = cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    head_multiple = max(1, multiple // head_dim)
    att_f, mlp_f = ([1.0] * n, [1.0] * n) if kind == "uniform" else shaped_fractions(n, plan)
    target = 0.5 * adapter.block_parameters()
    att_unit, mlp_unit = adapter.params_per_unit(GroupKey(0, ATTENTION)), adapter.params_per_unit(GroupKey(0, MLP))

    def sizes(s: float) -> list[tuple[int, int]]:
        return [(_rounded(min(1, a * s) * heads, head_multiple, heads), _rounded(min(1, m * s) * ff, multiple, ff))
                for a, m in zip(att_f, mlp_f, strict=True)]

    lo, hi = 0.0, 1.0  # scale the kept fractions so that 50% of the block parameters go (within one multiple)
    for _ in range(60):
        s = (lo + hi) / 2
        kept = sum(h * att_unit + c * mlp_unit for h, c in sizes(s))
        lo, hi = (s, hi) if kept < adapter.block_parameters() - target else (lo, s)
    for i, (h, c) in enumerate(sizes(s)):
        adapter.slice(GroupKey(i, ATTENTION), torch.arange(h))
        adapter.slice(GroupKey(i, MLP), torch.arange(c))
    print(f"{kind} (width multiple {multiple}): {adapter.block_parameters() / (2 * target):.3f} of the block "
          f"parameters kept; heads {[adapter.group_size(GroupKey(i, ATTENTION)) for i in range(n)]}, "
          f"MLP {[adapter.group_size(GroupKey(i, MLP)) for i in range(n)]}", flush=True)
    np.random.seed(seed)
    return model


def hf_forward_speedups(models: dict, prompt: int, repeats: int) -> dict[str, float]:
    """transformers float32 CPU forward of one prompt: parent seconds / model seconds, timed alternately."""
    import statistics
    import time

    import torch

    ids = torch.randint(3, 4096, (1, prompt), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for k, m in models.items():
                start = time.perf_counter()
                m(ids)
                if r:  # the first round warms up
                    times[k].append(time.perf_counter() - start)
    base = statistics.median(times["parent"])
    return {k: base / statistics.median(v) for k, v in times.items() if k != "parent"}


def hf_speedups(models: dict, prompt: int, generate: int, repeats: int, device: str) -> dict[str, dict]:
    """transformers on `device`: prefill of one `prompt`-token sequence and greedy decoding of `generate` tokens
    (with the KV cache), timed alternately with the parent; seconds and speedups over the parent."""
    import statistics
    import time

    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(3, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    times = {k: {"prefill": [], "decode": []} for k in models}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for k, m in models.items():
                sync()
                start = time.perf_counter()
                m(ids, use_cache=False)
                sync()
                mid = time.perf_counter()
                m.generate(ids, max_new_tokens=generate, min_new_tokens=generate, do_sample=False, pad_token_id=0)
                sync()
                if r:  # the first round warms up
                    times[k]["prefill"].append(mid - start)
                    times[k]["decode"].append(time.perf_counter() - mid - (mid - start))  # minus its own prefill
    med = {k: {s: statistics.median(v[s]) for s in v} for k, v in times.items()}
    base = med["parent"]
    return {k: {"prefill_s": v["prefill"], "decode_s": v["decode"],
                "prefill_speedup": base["prefill"] / v["prefill"], "decode_speedup": base["decode"] / v["decode"],
                "decode_tokens_per_s": generate / v["decode"]} for k, v in med.items()}


def not_k_quantised(path: str) -> int:
    """Block matrices of a K-quant file that llama.cpp stored in another type (rows it cannot block)."""
    import gguf

    return sum(1 for t in gguf.GGUFReader(path).tensors
               if t.name.startswith("blk.") and len(t.shape) > 1 and not t.tensor_type.name.lower().endswith("_k"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="f16,q8_0")
    p.add_argument("--width-multiples", default="1", help="comma-separated: widths as planned (1) and rounded")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hf", action="store_true", help="also time transformers' CPU forward (float32)")
    p.add_argument("--plan", default=None, help="a bonsai prune report.json whose per-layer sizes shape the plan")
    p.add_argument("--hf-only", action="store_true",
                   help="only transformers (no llama.cpp): prefill and decoding speed on --device, e.g. the CUDA row")
    p.add_argument("--shape", default=None, help="with --hf-only: a bench_prune.py shape (llama-2-7b ...) instead of 370M")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="with --hf-only: float32 | bfloat16 | float16")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-gguf")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.hf_only:
        return hf_only(args)
    from transformers import AutoTokenizer

    from bonsai.bench.llamacpp_speed import run_gguf_bench
    from bonsai.export.gguf import write_gguf
    from bonsai.models.aliases import TINY_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    args.out.mkdir(parents=True, exist_ok=True)
    variants = [(kind, int(m)) for kind in ("bonsai-plan", "uniform") for m in args.width_multiples.split(",")]
    hf = {}
    if args.hf:
        models = {"parent": build("parent", None)}
        models.update({f"{k}-w{m}": build(k, args.plan, m) for k, m in variants})
        hf = hf_forward_speedups(models, args.prompt, args.repeats)
        del models
    rows = []
    for dtype in args.dtypes.split(","):
        files = {}
        for kind, m in [("parent", 1), *variants]:
            name = "parent" if kind == "parent" else f"{kind}-w{m}"
            path = args.out / f"{name}-{dtype}.gguf"
            if not path.exists():
                report = write_gguf(build(kind, args.plan, m), tok, path, dtype, allow_fallback=True)
                print(f"  {path.name}: {report['architecture']}, {report['bytes'] / 2**20:.0f} MiB", flush=True)
            files[name] = str(path)
        for kind, m in variants:
            name = f"{kind}-w{m}"
            r = run_gguf_bench(files[name], files["parent"], args.prompt, args.generate, args.repeats)
            fallback = not_k_quantised(files[name]) if "_k" in dtype else 0
            size_ratio = Path(files["parent"]).stat().st_size / Path(files[name]).stat().st_size
            rows.append({"dtype": dtype, "model": kind, "width_multiple": m, "file_ratio": size_ratio,
                         "k_quant_fallback": fallback, "hf_forward_speedup": hf.get(name), **r})
            print(f"{dtype} {name}: params ratio {r['param_ratio']:.2f}x, file ratio {size_ratio:.2f}x, prompt "
                  f"{r['speedup']['prompt']:.2f}x, generation {r['speedup']['generate']:.2f}x "
                  f"({r['models']['model']['generate_tokens_per_second']:.1f} vs "
                  f"{r['models']['baseline']['generate_tokens_per_second']:.1f} tok/s)"
                  + (f", not K-quantised: {fallback}" if fallback else "")
                  + (f", transformers forward {hf[name]:.2f}x" if name in hf else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def hf_only(args) -> None:
    """Parent, per-layer plan and uniform, each at every width multiple, in transformers on one device."""
    import torch
    from bench_prune import SHAPES

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    shape = {k: v for k, v in SHAPES[args.shape].items() if k != "model_type"} if args.shape else None
    variants = [(kind, int(m)) for kind in ("bonsai-plan", "uniform") for m in args.width_multiples.split(",")]
    models = {"parent": build("parent", None, shape=shape, device=args.device, dtype=dtype)}
    models.update({f"{k}-w{m}": build(k, args.plan, m, shape=shape, device=args.device, dtype=dtype) for k, m in variants})
    res = hf_speedups(models, args.prompt, args.generate, args.repeats, args.device)
    print(f"transformers on {args.device} ({args.dtype}), {args.shape or '370M'} shape, prompt {args.prompt}, "
          f"{args.generate} generated tokens, median of {args.repeats}:")
    for name, r in res.items():
        print(f"  {name:18s} prefill {r['prefill_s'] * 1e3:8.1f} ms ({r['prefill_speedup']:.2f}x)  decode "
              f"{r['decode_tokens_per_s']:7.1f} tok/s ({r['decode_speedup']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
