"""Candidate selection and sub-model sampling with complements (paper Section 3.2).

Per group, the top (1 - 2 p_iter) units by prior are fixed; the rest are candidates. Each sampled
sub-model keeps a prior-weighted random half of the candidates (presence probability increasing with
rho) and drops the others; its complement drops exactly the candidates the sample kept.
"""

from __future__ import annotations

import math

import numpy as np


def candidate_units(prior: np.ndarray, p_iter: float, multiple: float = 2.0) -> np.ndarray:
    """Indices of the lowest-prior ceil(multiple x p_iter x n) units (at least one when the group is not empty);
    the paper's multiple is 2 (the top 1 - 2 p_iter are fixed)."""
    n = len(prior)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    n_cand = min(n, max(1, math.ceil(multiple * p_iter * n - 1e-9)))
    order = np.argsort(prior, kind="stable")
    return np.sort(order[:n_cand])


def _log_weights(prior: np.ndarray) -> np.ndarray:
    p = np.asarray(prior, dtype=np.float64)
    p = np.where(np.isfinite(p), p, 0.0)
    p = np.clip(p, 0.0, None)
    if p.sum() <= 0:
        return np.zeros_like(p)
    with np.errstate(divide="ignore"):
        return np.log(p / p.mean())


def sample_keep(prior_candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep-vector over candidates: ceil(n/2) kept, drawn without replacement with weights rho (Gumbel top-k)."""
    n = len(prior_candidates)
    n_keep = n - n // 2
    keys = _log_weights(prior_candidates) + rng.gumbel(size=n)
    keep = np.zeros(n, dtype=bool)
    keep[np.argsort(-keys, kind="stable")[:n_keep]] = True
    return keep


def sample_masks(candidate_priors: list[np.ndarray], n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_samples, total candidates) 0/1 array: n_samples/2 sampled masks, each followed by its complement."""
    total = sum(len(p) for p in candidate_priors)
    masks = np.zeros((n_samples, total), dtype=np.uint8)
    for i in range(0, n_samples, 2):
        keep = np.concatenate([sample_keep(p, rng) for p in candidate_priors]) if total else np.zeros(0, bool)
        masks[i] = keep
        if i + 1 < n_samples:
            masks[i + 1] = ~keep
    return masks


def probe_masks(candidate_priors: list[np.ndarray], levels: int, reach: list[int] | None = None) -> np.ndarray:
    """(groups x levels, total candidates) 0/1 keep-array for the probe selection: one sub-model per group and
    depth, dropping that group's ceil(c * l / levels) lowest-prior candidates (l = 1..levels) and nothing else.
    `reach[g]`: probe only the lowest-prior c of group g's candidates (default all; the allocation search keeps a
    wider pool than the probes measure)."""
    total = sum(len(p) for p in candidate_priors)
    rows = []
    offset = 0
    for g, p in enumerate(candidate_priors):
        order = np.argsort(np.asarray(p, dtype=np.float64), kind="stable")
        c = len(order) if reach is None else min(len(order), reach[g])
        for depth in probe_depths(c, levels):
            row = np.ones(total, dtype=np.uint8)
            row[offset + order[:depth]] = 0
            rows.append(row)
        offset += len(order)
    return np.stack(rows) if rows else np.zeros((0, total), dtype=np.uint8)


def probe_depths(candidates: int, levels: int) -> list[int]:
    """The distinct depths probed in a group of `candidates` candidates (the last is all of them)."""
    return sorted({max(1, math.ceil(candidates * level / levels - 1e-9)) for level in range(1, levels + 1)})


def iteration_rng(seed: int, iteration: int, stream: int) -> np.random.Generator:
    """The random stream `stream` of iteration `iteration`: the same whatever ran before it (resume)."""
    return np.random.default_rng([seed, iteration, stream])
