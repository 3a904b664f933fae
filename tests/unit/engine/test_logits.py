"""Losses from the head a slice of the vocabulary at a time equal those of the model's whole logits, in every family."""

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, tiny_model

from bonsai.adapters import get_adapter
from bonsai.engine.divergence import teacher_topk, topk_kl
from bonsai.engine.logits import ChunkedHead

pytestmark = pytest.mark.unit


def whole(model, batch):
    with torch.no_grad():
        return model(batch).logits.float()


def sliced(model, width: int) -> ChunkedHead:
    head = ChunkedHead(model, chunk_bytes=0)
    head.min_slice = width  # slices of `width` vocabulary entries
    return head


@pytest.mark.parametrize("family", FAMILIES)
def test_head_logits_equal_the_models_own_in_every_family(family):
    """The adapter's head (with Gemma-2/3's soft-capping, Granite's scaling, Phi's head bias), slice by slice on the
    final hidden states, is the model's own output, so a loss taken slice by slice is the model's loss."""
    model = tiny_model(family, "eager", final_logit_softcapping=3.0) if family == "gemma3" else tiny_model(family)
    batch = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    head = sliced(model, 40)
    with torch.no_grad():
        rows, piece, slices = head._slices(batch)
        slices = list(slices)
        got = torch.cat([piece(a, b) for a, b in slices], 1)
    assert head.adapter is not None  # the self-check passed: no fallback to whole logits
    assert slices == [(0, 40), (40, 80), (80, 97)] and rows == 3 * 10
    torch.testing.assert_close(got, whole(model, batch)[:, :-1].reshape(rows, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("width", [7, 40, 1024])
def test_nll_kl_and_topk_match_whole_logits(width):
    model = tiny_model("llama-gqa")
    batch = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(1))
    logits = whole(model, batch)
    head = sliced(model, width)
    with torch.no_grad():
        nll = head.nll(batch)
        nll2, top = head.nll_and_topk(batch, 5)
    expect = F.cross_entropy(logits[:, :-1].reshape(-1, 97), batch[:, 1:].reshape(-1), reduction="none").view(4, -1).sum(1)
    torch.testing.assert_close(nll, expect, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(nll2, expect, atol=1e-5, rtol=1e-6)
    ref = teacher_topk(logits[:, :-1], 5)
    torch.testing.assert_close(top.logprobs, ref.logprobs)
    torch.testing.assert_close(top.tail, ref.tail)
    assert torch.equal(top.ids, ref.ids)
    other = tiny_model("llama-gqa", seed=1)
    for direction in ("forward", "reverse"):
        with torch.no_grad():
            kl = sliced(other, width).kl(batch, ref, direction)
        torch.testing.assert_close(kl, topk_kl(whole(other, batch)[:, :-1], ref, direction).sum(1), atol=1e-5, rtol=1e-5)


def test_top_k_of_the_whole_vocabulary_has_no_tail():
    model = tiny_model("llama")
    batch = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    ref = teacher_topk(whole(model, batch)[:, :-1], 97)
    other = tiny_model("llama", seed=2)
    with torch.no_grad():
        kl = sliced(other, 30).kl(batch, ref)
    torch.testing.assert_close(kl, topk_kl(whole(other, batch)[:, :-1], ref).sum(1), atol=1e-5, rtol=1e-5)


def test_gradients_match_whole_logits():
    model = tiny_model("gemma2").double()
    batch = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(4))
    weights = [get_adapter(model).output_projection(k).weight for k in get_adapter(model).groups()]
    head = ChunkedHead(model, chunk_bytes=2 * 2 * 97 * 4)  # two positions at a time
    grads, total = head.nll_grad(batch, weights, scale=0.5)
    logits = model(batch).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, 97), batch[:, 1:].reshape(-1), reduction="sum")
    expect = torch.autograd.grad(loss * 0.5, weights)
    assert total == pytest.approx(float(loss.detach()))
    for g, e in zip(grads, expect, strict=True):  # the head's logits are float32 whatever the model
        torch.testing.assert_close(g, e, atol=1e-6 * float(e.abs().max()), rtol=1e-4)


def test_a_head_the_adapter_gets_wrong_falls_back_to_whole_logits(monkeypatch):
    model = tiny_model("gemma2")
    adapter_class = type(get_adapter(model))
    monkeypatch.setattr(adapter_class, "head_logits",
                        lambda self, h, start=0, stop=None: self.model.get_output_embeddings()(h))  # no cap
    batch = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    head = ChunkedHead(model)
    with torch.no_grad():
        nll = head.nll(batch)
    assert head.adapter is None
    logits = whole(model, batch)
    expect = F.cross_entropy(logits[:, :-1].reshape(-1, 97), batch[:, 1:].reshape(-1), reduction="none").view(2, -1).sum(1)
    torch.testing.assert_close(nll, expect)
