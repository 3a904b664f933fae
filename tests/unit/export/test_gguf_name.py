"""general.name: llama.cpp keys Phi-3 token attributes on the name and crashes if those tokens are missing."""

from bonsai.export.gguf import PHI3_NAMED_TOKENS, _model_name


class _Tok:
    def __init__(self, vocab):
        self.vocab = {t: i for i, t in enumerate(vocab)}

    def get_vocab(self):
        return self.vocab


def test_phi3_name_kept_when_its_tokens_exist_and_renamed_when_not():
    assert _model_name("phi3-pruned-30", _Tok(PHI3_NAMED_TOKENS)) == "phi3-pruned-30"
    assert _model_name("Phi-3-mini-50", _Tok(["a", "b"])) == "Phi_3-mini-50"
    assert _model_name("phi3", _Tok(["a"])) == "phi_3"
    assert _model_name("llama-30", _Tok(["a"])) == "llama-30"


def test_space_prefix_reads_both_sentencepiece_forms_and_refuses_others():
    from bonsai.export.gguf_vocab import space_prefix

    sp = "\u2581"
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": sp}
    legacy = {"normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": sp}, replace]}}
    assert space_prefix(legacy) is True
    assert space_prefix({"normalizer": replace}) is False  # no prefix space (Gemma-style normalizer)
    meta = {"pre_tokenizer": {"type": "Metaspace", "replacement": sp, "prepend_scheme": "first", "split": False}}
    assert space_prefix(meta) is True
    meta["pre_tokenizer"]["prepend_scheme"] = "never"
    assert space_prefix(meta) is False
    assert space_prefix({"normalizer": {"type": "NFKC"}}) is None
    assert space_prefix({"pre_tokenizer": {"type": "Metaspace", "replacement": sp, "split": True}}) is None
