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
Byte-fallback BPE vocabularies (SentencePiece models in tokenizer.json form: LLaMA-1/2, Mistral-7B) are
written as llama.cpp's `llama` (SentencePiece) vocabulary: pieces, byte tokens <0xXX> as BYTE, a score per
piece from its merge rank, and whether a "▁" is prefixed (from the normalizer or Metaspace pre-tokenizer).
Anything else is refused in one line rather than exported with a tokenizer that would silently split text
differently.
"""

from __future__ import annotations

import json
import re

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


def space_prefix(spec: dict) -> bool | None:
    """For a byte-fallback BPE (a SentencePiece vocabulary in tokenizer.json form): whether a "▁" is put before
    the text, or None when its normalizer/pre-tokenizer is not one of the two SentencePiece forms llama.cpp's
    `llama` vocabulary reproduces (LLaMA-1/2, Mistral: Prepend("▁") + Replace(" ", "▁"); newer files: Metaspace)."""
    norm, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else ([norm] if norm else [])
    kinds = [st.get("type") for st in steps]
    replace_space = any(st.get("type") == "Replace" and (st.get("pattern") or {}).get("String") == " "
                        and st.get("content") == "\u2581" for st in steps)
    if not pre and kinds in (["Prepend", "Replace"], ["Replace"]) and replace_space:
        return kinds[0] == "Prepend" and steps[0].get("prepend") == "\u2581"
    if not norm and pre.get("type") == "Metaspace" and pre.get("replacement") == "\u2581" and not pre.get("split"):
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return scheme in ("first", "always")
    return None


def add_tokenizer(writer, tokenizer, model) -> None:
    """Write the `tokenizer.ggml.*` keys for `tokenizer` into a GGUFWriter: a byte-level BPE as llama.cpp's
    `gpt2` vocabulary, a byte-fallback BPE (SentencePiece-style: LLaMA-1/2, Mistral) as its `llama` one."""
    spec = _spec(tokenizer)
    body = spec.get("model", {})
    if body.get("type") == "BPE" and body.get("byte_fallback"):
        size = _add_sentencepiece(writer, spec, model)
    elif body.get("type") == "BPE":
        size = _add_byte_level(writer, spec, model)
    else:
        raise BonsaiError(f"only BPE tokenizers (byte-level, or SentencePiece-style with byte fallback) can be "
                          f"exported to GGUF so far (this one is {body.get('type')}); GGUF export refused")
    _add_specials(writer, tokenizer, model, size)


def _vocab_by_id(spec: dict, model) -> tuple[dict[int, str], dict[int, dict], int]:
    body = spec["model"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab = dict(body["vocab"])
    for tid, t in added.items():
        vocab.setdefault(t["content"], tid)
    by_id = {i: tok for tok, i in vocab.items()}
    size = max(int(model.config.vocab_size), max(by_id) + 1)
    return by_id, added, size


def _add_byte_level(writer, spec: dict, model) -> int:
    import gguf

    pre = pre_tokenizer_name(spec)
    by_id, added, size = _vocab_by_id(spec, model)
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
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    return size


def _add_sentencepiece(writer, spec: dict, model) -> int:
    """llama.cpp's `llama` (SentencePiece) vocabulary merges the adjacent pair whose joined piece scores
    highest; a BPE applies its merges in rank order. Scoring each piece by minus the rank of the merge that
    makes it (pieces no merge makes below every merged one) turns the one rule into the other."""
    import gguf

    prefix = space_prefix(spec)
    if prefix is None:
        raise BonsaiError(f"the tokenizer's normalizer/pre-tokenizer ({json.dumps(spec.get('normalizer'))[:80]}, "
                          f"{json.dumps(spec.get('pre_tokenizer'))[:80]}) is not a SentencePiece form llama.cpp "
                          "reproduces; GGUF export refused")
    by_id, added, size = _vocab_by_id(spec, model)
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in spec["model"].get("merges", [])]
    rank = {}
    for r, (a, b) in enumerate(merges):
        rank.setdefault(a + b, r)
    tokens, scores, types = [], [], []
    for i in range(size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1e9)
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(tok)
        if i in added:
            scores.append(0.0)
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", tok):
            scores.append(0.0)
            types.append(int(gguf.TokenType.BYTE))
        else:
            scores.append(-float(rank[tok]) if tok in rank else -float(len(merges) + i))
            types.append(int(gguf.TokenType.NORMAL))
    if len(set(tokens)) != len(tokens):
        raise BonsaiError("the tokenizer has duplicate token strings, which a GGUF vocabulary cannot hold; export refused")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prefix)
    return size


def _add_specials(writer, tokenizer, model, size: int) -> None:
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
