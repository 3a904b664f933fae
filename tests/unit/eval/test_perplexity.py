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
