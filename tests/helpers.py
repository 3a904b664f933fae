"""Tiny random models of every supported family, built from configs (no download)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from shapes import bos_adding  # noqa: E402,F401  (a tokenizer that adds BOS, as Gemma's and LLaMA's do)


def tiny_config(family: str, attn: str = "eager", **overrides):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=48, num_hidden_layers=3,
                  max_position_embeddings=128)
    # sizes go to the constructor, so that derived fields (Qwen2's per-layer types) follow them
    for key in list(overrides):
        if key in common:
            common[key] = overrides.pop(key)
    if family == "llama":
        cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
    elif family == "llama-gqa":
        cfg = transformers.LlamaConfig(num_attention_heads=8, num_key_value_heads=2, head_dim=8, **common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                         sliding_window=None, **common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False,
                                       **common)
    elif family == "phi":
        cfg = transformers.PhiConfig(num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **common)
    elif family == "qwen3":  # head_dim 24 != hidden / heads
        cfg = transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                       use_sliding_window=False, **common)
    elif family == "gemma":
        cfg = transformers.GemmaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=32, **common)
    elif family == "gemma2":  # soft-capping, query_pre_attn_scalar, sliding layers alternating with global ones
        cfg = transformers.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=3.0, **common)
    elif family == "gemma3":
        cfg = transformers.Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                            query_pre_attn_scalar=24, sliding_window=6, sliding_window_pattern=2,
                                            **common)
    elif family == "granite":
        cfg = transformers.GraniteConfig(num_attention_heads=4, num_key_value_heads=2, embedding_multiplier=6.0,
                                         residual_multiplier=0.3, attention_multiplier=0.2, logits_scaling=4.0,
                                         **common)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj, GQA, LongRoPE (long factors past 16 positions)
        longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                    "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.2 * i for i in range(8)]}
        cfg = transformers.Phi3Config(num_attention_heads=4, num_key_value_heads=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      original_max_position_embeddings=16, rope_parameters=longrope, **common)
    elif family == "olmo2":
        cfg = transformers.Olmo2Config(num_attention_heads=4, num_key_value_heads=4, **common)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = attn
    return cfg


def tiny_model(family: str, attn: str = "eager", seed: int = 0, **overrides):
    if family == "gemma2":
        attn = "eager"  # soft-capped attention scores: transformers runs Gemma-2 with eager attention only
    torch.manual_seed(seed)
    cfg = tiny_config(family, attn, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    # random biases so that bias slicing is exercised
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)
    return model.eval()


FAMILIES = ["llama", "llama-gqa", "mistral", "qwen2", "phi", "qwen3", "gemma", "gemma2", "gemma3", "granite", "olmo2", "phi3"]
# families whose attention heads cannot be removed exactly (MLP channels only)
MLP_ONLY = {"olmo2"}


def sentencepiece_style_tokenizer(folder, metaspace: bool = False):
    """A LLaMA-2-style tokenizer.json (BPE with byte fallback over "▁"-marked words, <unk> <s> </s> and the 256
    byte tokens first), trained on the shipped KJV text: what a SentencePiece vocabulary looks like to
    transformers. `metaspace`: the newer form (Metaspace pre-tokenizer instead of the Prepend/Replace normalizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from bonsai.data.sources import load_text

    lines = [line for line in load_text("kjv", "train").text[:300000].splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False, limit_alphabet=150,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(lines, trainer)
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    else:
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


BOS_FAMILIES = {"gemma", "gemma2", "gemma3"}  # their test checkpoints carry a BOS-adding tokenizer, as the real ones do


def assert_within_one_unit(report: dict, sparsity: float, unit_params: int) -> None:
    """The run removed `sparsity` of the block parameters within one unit (`unit_params`, the largest unit it
    could remove) either side: a target missed short is as wrong as one overshot."""
    t = report["totals"]
    removed = t["block_params_before"] - t["block_params_after"]
    target = sparsity * t["block_params_before"]
    assert abs(removed - target) < unit_params, (removed, target, unit_params)


def gguf_logits(path, tokens: list[int], n_ctx: int = 2048):
    """Logits of one token window from a GGUF file, with llama.cpp loaded and freed around the call."""
    from bonsai.export.llamacpp import GGUFModel

    with GGUFModel(path, n_ctx=n_ctx) as model:
        return model.logits(tokens)


def crash_resume_and_straight(args: list[str], out, abort: str) -> tuple[list[dict], list[dict]]:
    """`bonsai prune ARGS` killed after `abort` sub-model evaluations and rerun, and the same command uninterrupted:
    asserts the two saved models are bit-identical and returns both reports' iterations (resumed, straight)."""
    import json
    import os
    import subprocess

    from safetensors.torch import load_file

    out = Path(out)
    crashed = subprocess.run(args + ["--out", str(out / "resumed")], capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, BONSAI_ABORT_AFTER_EVALS=abort))
    assert crashed.returncode == 75, crashed.stderr
    resumed = subprocess.run(args + ["--out", str(out / "resumed")], capture_output=True, text=True, timeout=600)
    straight = subprocess.run(args + ["--out", str(out / "straight")], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and straight.returncode == 0, resumed.stderr + straight.stderr
    a = load_file(out / "resumed" / "model.safetensors")
    b = load_file(out / "straight" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return tuple(json.loads((out / d / "report.json").read_text())["iterations"] for d in ("resumed", "straight"))
