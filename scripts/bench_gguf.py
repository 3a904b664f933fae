#!/usr/bin/env python
"""Speed where pruned models are served: llama.cpp prompt and generation tokens/s, pruned vs parent, side by side.

A ~370M-parameter LLaMA shape with random weights (hidden 1024, 24 layers, 16 heads, MLP 2816: compute
dominates on a CPU) is pruned to 50% of its block parameters twice, (a) with a per-layer plan shaped like
Bonsai's allocation on SmolLM2 (first and last layers kept widest, middle layers thinnest; `--plan
report.json` takes the fractions from a real `bonsai prune` report instead) and (b) uniformly; all three are
exported with `bonsai export` and measured alternately by `bonsai bench` (median of repeats).

    python scripts/bench_gguf.py --dtypes f16,q8_0 --prompt 256 --generate 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


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


def build(kind: str, plan: str | None, seed: int = 0):
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(cfg).eval()
    if kind == "parent":
        return model
    adapter = get_adapter(model)
    n = cfg.num_hidden_layers
    att_f, mlp_f = ([1.0] * n, [1.0] * n) if kind == "uniform" else shaped_fractions(n, plan)
    target = 0.5 * adapter.block_parameters()
    att_unit, mlp_unit = adapter.params_per_unit(GroupKey(0, ATTENTION)), adapter.params_per_unit(GroupKey(0, MLP))
    lo, hi = 0.0, 1.0  # scale the kept fractions so that 50% of the block parameters go
    for _ in range(60):
        s = (lo + hi) / 2
        kept = sum(round(min(1, a * s) * 16) * att_unit + round(min(1, m * s) * 2816) * mlp_unit
                   for a, m in zip(att_f, mlp_f, strict=True))
        lo, hi = (s, hi) if kept < adapter.block_parameters() - target else (lo, s)
    for i, (a, m) in enumerate(zip(att_f, mlp_f, strict=True)):
        adapter.slice(GroupKey(i, ATTENTION), torch.arange(max(1, round(min(1, a * s) * 16))))
        adapter.slice(GroupKey(i, MLP), torch.arange(max(1, round(min(1, m * s) * 2816))))
    print(f"{kind}: {adapter.block_parameters() / (2 * target):.3f} of the block parameters kept; "
          f"heads {[adapter.group_size(GroupKey(i, ATTENTION)) for i in range(n)]}, "
          f"MLP {[adapter.group_size(GroupKey(i, MLP)) for i in range(n)]}", flush=True)
    np.random.seed(seed)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="f16,q8_0")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--generate", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--plan", default=None, help="a bonsai prune report.json whose per-layer sizes shape the plan")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-gguf")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    from transformers import AutoTokenizer

    from bonsai.bench.llamacpp_speed import run_gguf_bench
    from bonsai.export.gguf import write_gguf
    from bonsai.models.aliases import TINY_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dtype in args.dtypes.split(","):
        files = {}
        for kind in ("parent", "bonsai-plan", "uniform"):
            path = args.out / f"{kind}-{dtype}.gguf"
            if not path.exists():
                report = write_gguf(build(kind, args.plan), tok, path, dtype)
                print(f"  {path.name}: {report['architecture']}, {report['bytes'] / 2**20:.0f} MiB", flush=True)
            files[kind] = str(path)
        for kind in ("bonsai-plan", "uniform"):
            r = run_gguf_bench(files[kind], files["parent"], args.prompt, args.generate, args.repeats)
            rows.append({"dtype": dtype, "model": kind, **r})
            print(f"{dtype} {kind}: params ratio {r['param_ratio']:.2f}x, prompt {r['speedup']['prompt']:.2f}x, "
                  f"generation {r['speedup']['generate']:.2f}x "
                  f"({r['models']['model']['generate_tokens_per_second']:.1f} vs "
                  f"{r['models']['baseline']['generate_tokens_per_second']:.1f} tok/s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
