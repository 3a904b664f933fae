"""FLOP accounting of `bonsai bench` against PyTorch's own FLOP counter, on full and pruned models."""

import pytest
import torch
from helpers import tiny_model
from torch.utils.flop_counter import FlopCounterMode

from bonsai.adapters import GroupKey, get_adapter
from bonsai.bench.speed import forward_flops_per_token, semi_structured_supported

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("family", ["llama", "llama-gqa", "phi"])
def test_flops_per_token_match_the_flop_counter(family):
    model = tiny_model(family, "eager", tie_word_embeddings=False)
    adapter = get_adapter(model)
    adapter.slice(GroupKey(1, "attention"), torch.tensor([0]))
    adapter.slice(GroupKey(2, "mlp"), torch.arange(10))
    seqlen = 32
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randint(0, 97, (1, seqlen)))
    measured = counter.get_total_flops() / seqlen
    assert forward_flops_per_token(model, seqlen) == pytest.approx(measured, rel=0.02)


def test_semi_structured_support_is_explained_on_cpu():
    assert "NVIDIA GPU" in semi_structured_supported(torch.device("cpu"), torch.float16)
