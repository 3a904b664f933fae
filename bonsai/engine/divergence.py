"""Distillation against a teacher kept only as its top-k log-probabilities plus the tail mass.

Caching the full distribution is infeasible at scale (30k x 512 tokens x 32k vocabulary in fp16 is about
1 TB), so each position stores the teacher's k most likely token ids, their log-probabilities and the log
of the remaining mass r = 1 - sum_{top-k} p. The KL is then taken between the two distributions
*coarsened* to k+1 outcomes (the k teacher tokens, and "any other token"):

    forward:  KL(p || q) ~= sum_{i in S} p_i (log p_i - log q_i) + r_p (log r_p - log r_q)
    reverse:  KL(q || p) ~= sum_{i in S} q_i (log q_i - log p_i) + r_q (log r_q - log r_p)

where S is the teacher's top-k set, q the student's full softmax and r_q the student's mass outside S.
By the data-processing inequality this is a lower bound on the full KL, equal to it when the teacher's
tail is empty (k = vocabulary size) or when the student matches the teacher's shape inside the tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class TopK:
    """A teacher distribution coarsened to its top-k tokens plus the tail: (..., k) and (...)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    tail: torch.Tensor  # log of the probability mass outside the top-k (may be -inf)

    def to(self, device: torch.device) -> TopK:
        return TopK(self.logprobs.to(device), self.ids.to(device), self.tail.to(device))


def teacher_topk(logits: torch.Tensor, k: int) -> TopK:
    """Top-k log-probabilities (float32), ids, and the log tail mass from full teacher logits."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    k = min(k, logp.shape[-1])
    values, ids = logp.topk(k, dim=-1)
    return TopK(values, ids, _log_rest(logp, ids))


def _log_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `ids`, computed from the other entries (no 1 - sum cancellation)."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)


def normalised(t: TopK) -> TopK:
    """Renormalise after fp16 storage so the k+1 outcomes sum to one exactly."""
    lp, tail = t.logprobs.float(), t.tail.float()
    z = torch.logaddexp(lp.logsumexp(dim=-1), tail)
    return TopK(lp - z[..., None], t.ids, tail - z)


def _plogp_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), with 0 where p = 0 (also when log q = -inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def topk_kl(student_logits: torch.Tensor, teacher: TopK, direction: str = "forward") -> torch.Tensor:
    """Per-position KL on the coarsened support (shape = student_logits.shape[:-1]), in float32."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}")
    ids = teacher.ids.long()
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    whole = ids.shape[-1] == logq.shape[-1]  # the support is the whole vocabulary: no tail (no -inf gradients)
    return coarse_kl(teacher, logq.gather(-1, ids), None if whole else _log_rest(logq, ids), direction)


def coarse_kl(teacher: TopK, q_top: torch.Tensor, q_tail: torch.Tensor | None, direction: str = "forward"
              ) -> torch.Tensor:
    """The KL of `topk_kl` from the student's log-probabilities of the teacher's top-k tokens and the log of its
    mass outside them (None: the top-k is the whole vocabulary)."""
    t = normalised(teacher)
    if direction == "forward":
        kl = _plogp_diff(t.logprobs, q_top).sum(-1)
    else:
        kl = _plogp_diff(q_top, t.logprobs).sum(-1)
    if q_tail is None:
        return kl
    if direction == "forward":
        return kl + _plogp_diff(t.tail, q_tail)
    return kl + _plogp_diff(q_tail, t.tail)
