"""Tokenizer metadata for GGUF, so that llama.cpp tokenises exactly as the Hugging Face tokenizer does.

Byte-level BPE tokenizers (GPT-2 style: LLaMA-3, Qwen2, SmolLM, Phi-2, and the tiny models bonsai trains)
are written as llama.cpp's `gpt2` vocabulary: tokens and merges as in `tokenizer.json`, token types (special
added tokens are CONTROL, other added tokens USER_DEFINED), special ids, and whether a BOS/EOS is added
(found by tokenising a probe string, so it is what the tokenizer does, not what a config claims).

llama.cpp picks its pre-tokenizer regex by the name in `tokenizer.ggml.pre`; llama.cpp's own converter
finds that name from a hash of a test tokenisation, which a pruned-and-retrained or custom vocabulary never
matches. Here the name follows from the pre-tokenizer itself:
  * ByteLevel with the GPT-2 regex (`use_regex`)         -> `gpt-2`
  * Split(LLaMA-3 regex) then ByteLevel without a regex    -> `llama-bpe`
  * Split(Qwen2 regex) then ByteLevel without a regex      -> `qwen2`
Anything else (a normalizer, a prefix space, SentencePiece vocabularies) is refused in one line rather than
exported with a tokenizer that would silently split text differently.
"""

from __future__ import annotations

import json

from bonsai.errors import BonsaiError

GPT2 = "gpt-2"
# the regexes llama.cpp implements for these names (src/llama-vocab.cpp, llm_tokenizer_bpe)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
SPLIT_REGEXES = {_LLAMA3: "llama-bpe", _QWEN2: "qwen2"}


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise BonsaiError("GGUF export needs a fast (tokenizers) tokenizer with a tokenizer.json")
    return json.loads(backend.to_str())


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, or a one-line refusal."""
    if spec.get("normalizer"):
        raise BonsaiError(f"the tokenizer has a {spec['normalizer'].get('type')} normalizer, which llama.cpp's BPE "
                          "vocabularies cannot reproduce; GGUF export refused")
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return GPT2
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space", False)):
            pattern = steps[0].get("pattern", {})
            regex = pattern.get("Regex") or pattern.get("String")
            if regex in SPLIT_REGEXES:
                return SPLIT_REGEXES[regex]
    raise BonsaiError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp equivalent that "
                      "bonsai knows; GGUF export refused")


def add_tokenizer(writer, tokenizer, model) -> None:
    """Write the `tokenizer.ggml.*` keys for `tokenizer` (a byte-level BPE) into a GGUFWriter."""
    import gguf

    spec = _spec(tokenizer)
    body = spec.get("model", {})
    if body.get("type") != "BPE" or body.get("byte_fallback"):
        raise BonsaiError(f"only byte-level BPE tokenizers can be exported to GGUF so far (this one is "
                          f"{body.get('type')}{' with byte fallback' if body.get('byte_fallback') else ''}, a "
                          "SentencePiece-style vocabulary); GGUF export refused")
    pre = pre_tokenizer_name(spec)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = dict(body["vocab"])
    for tid, t in added.items():
        vocab.setdefault(t["content"], tid)
    by_id = {i: tok for tok, i in vocab.items()}
    size = max(int(model.config.vocab_size), max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(by_id[i])
            types.append(int(gguf.TokenType.NORMAL))
    if len(set(tokens)) != len(tokens):
        raise BonsaiError("the tokenizer has duplicate token strings, which a GGUF vocabulary cannot hold; export refused")
    merges = [m if isinstance(m, str) else " ".join(m) for m in body.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is None:
            tid = getattr(model.config, f"{name}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < size:
            add(tid)
    probe = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(len(probe) > len(plain) and probe[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(probe) > len(plain) and probe[-1] == tokenizer.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
