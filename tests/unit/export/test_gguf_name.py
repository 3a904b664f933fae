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
