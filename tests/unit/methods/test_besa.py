"""BESA's building blocks against brute force: soft/hard masks, the straight-through gradient, rescaling, quantisation."""

import pytest
import torch

from bonsai.methods.besa import LayerSparsity, fake_quantise, init_logits, rescale_to_target

pytestmark = pytest.mark.unit


def _state(rows, cols, d, per_row, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(cols, generator=g) for _ in range(rows)])
    levels = torch.arange(d, dtype=torch.float32) / d
    logits = torch.nn.Parameter(torch.randn((rows, d) if per_row else (d,), generator=g))
    return LayerSparsity(logits, ranks, levels)


@pytest.mark.parametrize("per_row", [False, True])
def test_soft_keep_is_the_probability_that_the_sampled_level_keeps_the_weight(per_row):
    s = _state(3, 12, 5, per_row)
    pi = torch.softmax(s.logits, -1).detach()
    soft = s.soft_keep().detach()
    for i in range(3):
        p = pi[i] if per_row else pi
        for j in range(12):
            r = int(s.ranks[i, j])
            expected = sum(float(p[d]) for d in range(5) if d / 5 * 12 <= r)  # level d prunes ranks < d/D*C
            assert abs(soft[i, j].item() - expected) < 1e-6


def test_hard_mask_prunes_the_lowest_ranks_and_gradient_reaches_logits():
    s = _state(4, 10, 8, per_row=True, seed=1)
    alpha = s.expected().detach()
    hard = s.hard_keep(alpha)
    for i in range(4):
        n = round(float(alpha[i]) * 10)
        assert set(torch.nonzero(hard[i] == 0).flatten().tolist()) == set(torch.nonzero(s.ranks[i] < n).flatten().tolist())
    mask = s.mask()
    assert torch.equal(mask.detach(), hard)  # the forward pass sees the hard mask
    (mask * torch.randn(4, 10)).sum().backward()
    assert s.logits.grad is not None and s.logits.grad.abs().sum() > 0


def test_init_starts_at_the_target_and_rescale_hits_it():
    levels = torch.arange(100, dtype=torch.float32) / 100
    assert abs((torch.softmax(init_logits(0.5, levels, None), -1) @ levels).item() - 0.5) < 1e-3
    alphas = {"a": torch.tensor(0.3), "b": torch.tensor([0.6, 0.7]), "c": torch.tensor(0.9)}
    sizes = {"a": 100, "b": 300, "c": 50}
    out = rescale_to_target(alphas, sizes, 0.5)
    overall = sum(out[n].mean().item() * sizes[n] for n in sizes) / sum(sizes.values())
    assert abs(overall - 0.5) < 1e-6 and out["a"] < out["b"].min() < out["c"]


def test_fake_quantisation_levels_and_straight_through():
    w = torch.randn(6, 40, requires_grad=True)
    clip = torch.nn.Parameter(torch.full((6,), 4.0))
    q = fake_quantise(w, 3, clip)
    assert max(len(set(row.tolist())) for row in q.detach()) <= 8
    assert (q - w).abs().max() < (w.amax(1) - w.amin(1)).max() / 7
    q.sum().backward()
    assert clip.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()
