import math

import pytest
import torch
from helpers import tiny_model

from bonsai.eval.perplexity import window_nll

pytestmark = pytest.mark.unit


def hand_ppl(model, windows):
    """Independent loop: per-token log-softmax, one window at a time, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            for t in range(len(w) - 1):
                total -= logp[t, w[t + 1]].item()
                count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_ppl_matches_hand_loop(batch_size):
    model = tiny_model("llama", "sdpa")
    windows = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(0))
    result = window_nll(model, windows, batch_size)
    assert result.tokens == 5 * 11
    assert result.ppl == pytest.approx(hand_ppl(model, windows), rel=1e-5)


def test_half_precision_model_loss_accumulates_in_float32():
    model = tiny_model("llama", "sdpa").to(torch.bfloat16)
    windows = torch.randint(0, 97, (2, 8))
    result = window_nll(model, windows, 2)
    assert math.isfinite(result.ppl)


def _bos_text(tokenizer, n_tokens: int) -> str:
    """A KJV passage of exactly `n_tokens` tokens (without special tokens) under `tokenizer`."""
    from bonsai.data import load_text

    ids = tokenizer(load_text("kjv", "test").text[:20000], add_special_tokens=False)["input_ids"]
    for cut in range(n_tokens, n_tokens + 40):
        text = tokenizer.decode(ids[:cut])
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n_tokens:
            return text
    raise AssertionError("no text of that many tokens")


def test_bos_perplexity_matches_hand_loop(tiny_tokenizer, tmp_path):
    """`bonsai eval --bos always`: each window is BOS + seqlen-1 text tokens; every text token is predicted
    once (the first from BOS) and nothing predicts the BOS."""
    from bonsai.eval.runner import run_perplexity
    from bonsai.models.aliases import TINY_MODEL_DIR
    from bonsai.models.loading import load_model

    model = load_model(str(TINY_MODEL_DIR), dtype="float32", device="cpu")
    f = tmp_path / "t.txt"
    f.write_text(_bos_text(tiny_tokenizer, 200))
    result = run_perplexity(str(f), "tiny", seqlen=32, batch_size=4, model=model, tokenizer=tiny_tokenizer, bos="always")
    ids = tiny_tokenizer(f.read_text(), add_special_tokens=False)["input_ids"]
    bos = tiny_tokenizer.bos_token_id
    by_hand = [torch.tensor([bos] + ids[i:i + 31]) for i in range(0, 200 - 31 + 1, 31)]
    assert result["windows"] == len(by_hand) == 200 // 31
    assert result["bos"] == {"mode": "always", "token_id": bos, "token": tiny_tokenizer.bos_token}
    assert result["ppl"] == pytest.approx(hand_ppl(model, by_hand), rel=1e-5)
    without = run_perplexity(str(f), "tiny", seqlen=32, model=model, tokenizer=tiny_tokenizer, bos="auto")
    assert without["bos"]["token_id"] is None and without["ppl"] != pytest.approx(result["ppl"], rel=1e-3)


@pytest.mark.parametrize("seqlen", [24, 64])
def test_bos_perplexity_equals_lm_eval_rolling_loglikelihood(tiny_tokenizer, tmp_path, seqlen):
    """lm-eval's rolling log-likelihood starts a document with the BOS token and predicts every token; on a
    document of seqlen-1 tokens its one window is bonsai's BOS window, so the two log-likelihoods agree."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from bonsai.eval.runner import run_perplexity
    from bonsai.models.aliases import TINY_MODEL_DIR
    from bonsai.models.loading import load_model

    model = load_model(str(TINY_MODEL_DIR), dtype="float32", device="cpu")
    text = _bos_text(tiny_tokenizer, seqlen - 1)
    f = tmp_path / "doc.txt"
    f.write_text(text)
    ours = run_perplexity(str(f), "tiny", seqlen=seqlen, model=model, tokenizer=tiny_tokenizer, bos="always")
    assert ours["windows"] == 1
    lm = HFLM(pretrained=model, tokenizer=tiny_tokenizer, batch_size=1, max_length=seqlen)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (loglik,) = lm.loglikelihood_rolling([request], disable_tqdm=True)
    assert -ours["loss"] * (seqlen - 1) == pytest.approx(loglik, rel=1e-5)
