"""The top-k distillation loss against explicit k+1-outcome distributions and the exact full-vocabulary KL."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bonsai.engine.divergence import TopK, normalised, teacher_topk, topk_kl

pytestmark = pytest.mark.unit


def _coarse_kl_by_hand(student_logits, teacher_logits, k, direction):
    """Build the k+1 distributions explicitly in float64 numpy and take the KL."""
    out = np.zeros(student_logits.shape[:-1])
    s = torch.softmax(student_logits.double(), -1).numpy()
    t = torch.softmax(teacher_logits.double(), -1).numpy()
    for idx in np.ndindex(out.shape):
        top = np.argsort(-t[idx])[:k]
        rest = np.setdiff1d(np.arange(t.shape[-1]), top)
        p = np.append(t[idx][top], t[idx][rest].sum())
        q = np.append(s[idx][top], s[idx][rest].sum())
        a, b = (p, q) if direction == "forward" else (q, p)
        out[idx] = np.sum(a * (np.log(a) - np.log(b)))
    return out


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_kl_equals_explicit_coarsened_kl(direction):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 50, generator=g) * 2, torch.randn(2, 5, 50, generator=g) * 2
    got = topk_kl(student, teacher_topk(teacher, 8), direction).numpy()
    np.testing.assert_allclose(got, _coarse_kl_by_hand(student, teacher, 8, direction), rtol=1e-4, atol=1e-6)


def test_full_support_equals_exact_kl_and_topk_is_a_lower_bound():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 40, generator=g) * 3, torch.randn(3, 40, generator=g) * 3
    exact = F.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1), log_target=True,
                     reduction="none").sum(-1)
    torch.testing.assert_close(topk_kl(student, teacher_topk(teacher, 40)), exact, rtol=1e-5, atol=1e-6)
    assert (topk_kl(student, teacher_topk(teacher, 5)) <= exact + 1e-6).all()
    assert topk_kl(teacher, teacher_topk(teacher, 5)).abs().max() < 1e-5  # zero at the teacher itself


def test_fp16_storage_is_renormalised_and_gradients_are_finite():
    g = torch.Generator().manual_seed(2)
    teacher = teacher_topk(torch.randn(4, 30, generator=g) * 4, 6)
    stored = TopK(teacher.logprobs.half(), teacher.ids.to(torch.int16), teacher.tail)
    n = normalised(stored)
    torch.testing.assert_close(torch.logaddexp(n.logprobs.logsumexp(-1), n.tail), torch.zeros(4), atol=1e-6, rtol=0)
    student = torch.randn(4, 30, generator=g, requires_grad=True)
    for direction in ("forward", "reverse"):
        loss = topk_kl(student, stored, direction).mean()
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        torch.testing.assert_close(loss, topk_kl(student, teacher, direction).mean(), rtol=2e-3, atol=2e-3)
