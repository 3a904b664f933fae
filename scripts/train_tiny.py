#!/usr/bin/env python
"""Train a tiny language model of one family on a shipped corpus (CPU, minutes).

The defaults rebuild the shipped model `bonsai/assets/tiny-llama` (LLaMA, KJV):  python scripts/train_tiny.py
(about 10-15 minutes on 2 cores). The quality matrix trains one model per family on the Austen corpus:

    python scripts/train_tiny.py --family mistral --corpus austen --out runs/models/tiny-mistral-austen

Families: llama (multi-head attention), mistral (grouped-query attention, 3 query heads per key/value head),
phi (parallel attention and MLP, LayerNorm, GELU, partial rotary), gemma3 (Gemma-3's layout as its 270M model has
it: one key/value head for all query heads, GeGLU, sliding-window layers, and a tokenizer that starts every text
with BOS; trained on windows that start with BOS, as Gemma is). They are real (small) language models, so
pruning them shows real differences.
"""

from __future__ import annotations

import argparse
import gzip
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PhiConfig, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent.parent / "bonsai" / "assets"


def build_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def family_config(family: str, vocab: int, tok) -> object:
    common = dict(vocab_size=vocab, hidden_size=192, num_hidden_layers=6, num_attention_heads=6,
                  max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    if family == "llama":
        return LlamaConfig(intermediate_size=512, num_key_value_heads=6, rms_norm_eps=1e-5, **common)
    if family == "mistral":
        return MistralConfig(intermediate_size=512, num_key_value_heads=2, head_dim=32, sliding_window=None,
                             rms_norm_eps=1e-5, **common)
    if family == "phi":
        return PhiConfig(intermediate_size=768, num_key_value_heads=6, partial_rotary_factor=0.5, resid_pdrop=0.0,
                         embd_pdrop=0.0, attention_dropout=0.0, **common)
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(intermediate_size=512, num_attention_heads=4, num_key_value_heads=1, head_dim=48,
                                query_pre_attn_scalar=48, sliding_window=64,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                                **{k: v for k, v in common.items() if k != "num_attention_heads"})
    raise SystemExit(f"unknown family {family}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--family", default="llama", choices=("llama", "mistral", "phi", "gemma3"))
    p.add_argument("--corpus", default="kjv", choices=("kjv", "austen"))
    p.add_argument("--out", default=str(ASSETS / "tiny-llama"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    train_text = gzip.open(ASSETS / args.corpus / "train.txt.gz", "rt").read()
    test_text = gzip.open(ASSETS / args.corpus / "test.txt.gz", "rt").read()
    tok = build_tokenizer(train_text, args.vocab)
    train_ids = torch.tensor(tok(train_text, add_special_tokens=False)["input_ids"])
    test_ids = torch.tensor(tok(test_text, add_special_tokens=False)["input_ids"])
    bos = args.family == "gemma3"  # Gemma is only ever run with BOS at position 0: trained so, and its tokenizer adds it
    if bos:
        from tokenizers import processors

        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.bos_token_id)])
    text_len = args.seqlen - bos
    print(f"train tokens {len(train_ids)}, test tokens {len(test_ids)}")
    config = family_config(args.family, len(tok), tok)
    model = AutoModelForCausalLM.from_config(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(train_ids) - text_len - 1, (args.batch_size,), generator=g)
        batch = torch.stack([train_ids[i:i + text_len] for i in idx])
        if bos:
            batch = torch.cat([torch.full((args.batch_size, 1), tok.bos_token_id), batch], 1)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    windows = test_ids[: len(test_ids) // text_len * text_len].view(-1, text_len)
    if bos:
        windows = torch.cat([torch.full((len(windows), 1), tok.bos_token_id), windows], 1)
    with torch.no_grad():
        nll = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / len(windows)
    print(f"test ppl {math.exp(nll):.2f} over {len(windows)} windows of {args.seqlen}")
    model.to(torch.bfloat16).save_pretrained(args.out)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
