#!/usr/bin/env python
"""Real families' shapes with random weights: memory and time at the shape users prune, without a download.

A shape is a config read from the family's published `config.json` (sizes, attention layout, vocabulary);
the weights are the config's random initialisation. What memory and time depend on (widths, heads, key/value
groups, vocabulary, sliding windows) is the real model's; quality is not measured on these.

    python scripts/shapes.py --shape gemma-3-270m --out runs/shapes/gemma-3-270m
    bonsai prune --model runs/shapes/gemma-3-270m --sparsity 0.3 --calib austen --out runs/g30

`save` writes a model folder with a tokenizer that starts every text with BOS, as Gemma's and LLaMA-3's do
(SmolLM2's 49k vocabulary when `scripts/get_smollm2.py` has fetched it, else the shipped tiny one), so the
BOS path runs as it would on the real model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_GEMMA3_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]
SHAPES = {  # model_type, then the config's sizes
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
    # LLaMA-3-8B's widths, key/value groups and 128k vocabulary in 2 layers: the head and the MLP of the real model
    "llama-3-8b-2l": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                          rope_theta=500000.0),
    # google/gemma-3-270m: one key/value head of width 256 for 4 query heads, GeGLU, 5 of 6 layers sliding (512),
    # a tied 262,144-token vocabulary (168M of its 268M parameters)
    "gemma-3-270m": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                         max_position_embeddings=32768, sliding_window=512,
                         layer_types=[_GEMMA3_LAYERS[i % 6] for i in range(18)], query_pre_attn_scalar=256,
                         rope_theta=1000000.0, rope_local_base_freq=10000.0, tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True),
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),  # checks of the scripts
}


def shape_config(name: str):
    from transformers import AutoConfig

    sizes = dict(SHAPES[name])
    cfg = AutoConfig.for_model(sizes.pop("model_type"), **sizes)
    cfg._attn_implementation = "eager" if cfg.model_type == "gemma2" else "sdpa"
    return cfg


def build_shape(name: str, device="cpu", dtype=None, seed: int = 0):
    """A model of the shape with its config's random initialisation, in `dtype` on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(shape_config(name))
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def bos_adding(tokenizer):
    """A copy of a fast tokenizer that starts every encoded text with its BOS token, as Gemma's and LLaMA's do."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_token_id)])
    return tok


def save_shape(name: str, out: Path, seed: int = 0) -> Path:
    """The shape as a model folder (float32 safetensors) with a BOS-adding tokenizer."""
    from transformers import AutoTokenizer

    from bonsai.models.aliases import TINY_MODEL_DIR

    smollm2 = ROOT / "runs" / "models" / "smollm2-135m"
    tokenizer = bos_adding(AutoTokenizer.from_pretrained(smollm2 if (smollm2 / "config.json").exists() else TINY_MODEL_DIR))
    model = build_shape(name, seed=seed)
    if len(tokenizer) > model.config.vocab_size:
        raise SystemExit(f"the tokenizer's {len(tokenizer)} tokens do not fit the shape's {model.config.vocab_size}")
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if (args.out / "config.json").exists():
        print(f"{args.out} already holds a model")
        return
    save_shape(args.shape, args.out, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
