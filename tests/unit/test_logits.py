"""Losses from the head a chunk of positions at a time equal those of the model's whole logits, in every family."""

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, tiny_model

from bonsai.adapters import get_adapter
from bonsai.finetune.distill import teacher_topk, topk_kl
from bonsai.logits import ChunkedHead

pytestmark = pytest.mark.unit


def whole(model, batch):
    with torch.no_grad():
        return model(batch).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_head_logits_equal_the_models_own_in_every_family(family):
    """The adapter's head (with Gemma-2's soft-capping and Granite's scaling) on the final hidden states is the
    model's own output, so a chunked loss is the model's loss."""
    model = tiny_model(family, "eager", final_logit_softcapping=3.0) if family == "gemma3" else tiny_model(family)
    batch = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    head = ChunkedHead(model, chunk_bytes=4 * 97 * 3 * 4)  # 4 positions per chunk
    with torch.no_grad():
        pieces = list(head.chunks(batch))
    assert head.adapter is not None  # the self-check passed: no fallback to whole logits
    assert [(a, b) for a, b, _ in pieces] == [(0, 4), (4, 8), (8, 10)]
    got = torch.cat([logits for _, _, logits in pieces], 1)
    torch.testing.assert_close(got, whole(model, batch)[:, :-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_positions", [1, 3, 100])
def test_nll_kl_and_topk_match_whole_logits(chunk_positions):
    model = tiny_model("llama-gqa")
    batch = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(1))
    logits = whole(model, batch)
    head = ChunkedHead(model, chunk_bytes=chunk_positions * 4 * 97 * 4)
    with torch.no_grad():
        nll = head.nll(batch)
        nll2, top = head.nll_and_topk(batch, 5)
    expect = F.cross_entropy(logits[:, :-1].reshape(-1, 97), batch[:, 1:].reshape(-1), reduction="none").view(4, -1).sum(1)
    torch.testing.assert_close(nll, expect, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(nll2, expect, atol=1e-5, rtol=1e-6)
    ref = teacher_topk(logits[:, :-1], 5)
    torch.testing.assert_close(top.logprobs, ref.logprobs)
    assert torch.equal(top.ids, ref.ids)
    other = tiny_model("llama-gqa", seed=1)
    with torch.no_grad():
        kl = ChunkedHead(other, chunk_bytes=chunk_positions * 4 * 97 * 4).kl(batch, ref)
    torch.testing.assert_close(kl, topk_kl(whole(other, batch)[:, :-1], ref).sum(1), atol=1e-5, rtol=1e-5)


def test_a_head_the_adapter_gets_wrong_falls_back_to_whole_logits(monkeypatch):
    model = tiny_model("gemma2")
    adapter_class = type(get_adapter(model))
    monkeypatch.setattr(adapter_class, "head_logits", lambda self, h: self.model.get_output_embeddings()(h))  # no cap
    batch = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    head = ChunkedHead(model)
    with torch.no_grad():
        nll = head.nll(batch)
    assert head.adapter is None
    logits = whole(model, batch)
    expect = F.cross_entropy(logits[:, :-1].reshape(-1, 97), batch[:, 1:].reshape(-1), reduction="none").view(2, -1).sum(1)
    torch.testing.assert_close(nll, expect)
