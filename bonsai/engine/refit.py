"""The refit of one output projection from the Gram matrix of its input: the damped least-squares solve
behind every reconstruction (`bonsai.engine.reconstruction`), to the layer's own output or to a target's.

    lstsq: W'_S = W H[:, S] H[S, S]^-1,  H = G + lambda I  (least squares on the kept input columns S, damped
           towards the current weights; the layer's bias is refit jointly where it has one)
    bias : W'_S = W[:, S],  b' = b + W[:, R] mean(x_R)    (FLAP's compensation: the removed columns' mean)
    none : W'_S = W[:, S]                                 (the paper's Bonsai)

with lambda = damp x mean(diag G).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from bonsai.engine.linalg import cholesky_
from bonsai.errors import BonsaiError

RECONSTRUCT_MODES = ("lstsq", "bias", "none")


REFIT_TARGETS = ("own", "residual")


DEFAULT_DAMP = 1e-2


@dataclass
class Refit:
    """New weight (and bias, or None) for the kept columns, and what it changed on calibration tokens."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    error_dropped: float  # ||(W - W[:, S] embedded) X||^2 / ||W X||^2: removal without compensation
    error_refit: float  # the same with the refit weights (and bias)
    damp: float  # the damping finally used (raised when the Gram matrix was not positive definite)


def damp_scale(gram: torch.Tensor) -> float:
    """The unit of the damping: the mean diagonal of the Gram matrix (1 if it is all zero)."""
    scale = float(gram.diagonal().mean()) if gram.shape[0] else 0.0
    return scale if scale > 0 else 1.0


def _damped_cholesky(build: Callable[[], torch.Tensor], weight_dims: int, damp: float, scale: float,
                     warn: Callable[[str], None] | None, where: str) -> tuple[torch.Tensor, float]:
    """Cholesky factor of `build()` plus damp*scale on its first `weight_dims` diagonal entries, raising the
    damping x10 until it is positive definite. Returns the factor and the damping used. The matrix is built
    afresh for each try and factored in place: one k x k matrix beside the Gram matrix, where a copy to damp and
    a new factor made three (4.4 n x n matrices at the peak of LLaMA-3-8B's MLP refit, 3.4 GB)."""
    d = damp
    for _ in range(8):
        factor = build()
        factor.diagonal()[:weight_dims] += d * scale
        if cholesky_(factor):  # in its own memory (`engine.linalg`)
            if d != damp and warn is not None:
                warn(f"{where}: ill-conditioned Gram matrix, damping raised from {damp:g} to {d:g}")
            return factor, d
        del factor
        d = max(d * 10, 1e-6)
    raise BonsaiError(f"{where}: the Gram matrix of the calibration activations is not positive definite even with "
                      f"damping {d:g}; the calibration data may be degenerate")


def refit_projection(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, col_sum: torch.Tensor,
                     tokens: int, keep_cols: torch.Tensor, mode: str, damp: float = DEFAULT_DAMP,
                     warn: Callable[[str], None] | None = None, where: str = "layer",
                     target: TargetStats | None = None) -> Refit:
    """Closed-form refit of a linear y = W x + b restricted to input columns `keep_cols` (see module doc).

    All arithmetic happens in the Gram matrix's dtype; the result is cast back to the weight's dtype.
    With every column kept the weights are returned unchanged, unless `target` gives another output to fit
    (`--refit-target residual`, lstsq only): then the fit is to those target outputs t, from the cross term
    sum_t t x^T and sum_t t, with the same damping towards the current weights.
    """
    if target is not None:
        return _refit_to_target(weight, bias, gram, col_sum, tokens, keep_cols, target, damp, warn, where)
    if mode not in RECONSTRUCT_MODES:
        raise BonsaiError(f"unknown reconstruction {mode!r}: choose from {', '.join(RECONSTRUCT_MODES)}")
    dtype, device = gram.dtype, gram.device
    n_in = weight.shape[1]
    keep_cols = keep_cols.to(device=device, dtype=torch.long)
    removed = torch.ones(n_in, dtype=torch.bool, device=device)
    removed[keep_cols] = False
    W = weight.detach().to(device=device, dtype=dtype)
    b = None if bias is None else bias.detach().to(device=device, dtype=dtype)
    if not bool(removed.any()):
        return Refit(weight.detach().clone(), None if bias is None else bias.detach().clone(), 0.0, 0.0, 0.0)
    if not (torch.isfinite(gram).all() and torch.isfinite(col_sum).all()):
        raise BonsaiError(f"{where}: non-finite activation statistics (inf/NaN in the calibration forward pass); "
                          "nothing was written. Try --dtype float32 or other calibration data")
    W_S = W[:, keep_cols]
    new_b = b
    used_damp = 0.0
    if mode == "bias":
        mean = col_sum / max(tokens, 1)
        shift = W[:, removed] @ mean[removed]
        new_w, new_b = W_S, (shift if b is None else b + shift)
    elif mode == "lstsq" and len(keep_cols) > 0:
        # normal equations of min ||W X + b - W'_S X_S - b'||^2 + lam ||W'_S - W_S||^2, with [x_S; 1] when there is a bias
        k = len(keep_cols)
        rhs = W @ gram[:, keep_cols]  # W G[:, S]
        if b is not None:
            s_S = col_sum[keep_cols]
            rhs = torch.cat([rhs + b[:, None] * s_S[None, :], (W @ col_sum + b * tokens)[:, None]], dim=1)
        sol, used_damp = _damped_solve(gram, col_sum, tokens, keep_cols, b is not None, rhs, W_S, damp, warn, where)
        new_w, new_b = (sol, b) if b is None else (sol[:, :k], sol[:, k])
    else:  # none, or lstsq with nothing kept: the output is the (refit) bias alone
        new_w = W_S
        if mode == "lstsq" and tokens:
            shift = W @ (col_sum / tokens)
            new_b = shift if b is None else b + shift
    err_drop, err_fit = _relative_errors(W, b, gram, col_sum, tokens, keep_cols, removed, W_S, new_w, new_b)
    return Refit(new_w.to(weight.dtype), None if new_b is None else new_b.to(weight.dtype), err_drop, err_fit, used_damp)


def _relative_errors(W, b, gram, col_sum, tokens, keep_cols, removed, W_S, new_w, new_b) -> tuple[float, float]:
    """Output error over the calibration tokens, relative to the output power, of dropping and of the refit."""

    def sq_err(D: torch.Tensor, db: torch.Tensor | None) -> float:
        # sum_t ||D x_t + db||^2 = tr(D G D^T) + 2 db^T D s + n ||db||^2
        val = (D @ gram * D).sum()
        if db is not None:
            val = val + 2 * db @ (D @ col_sum) + tokens * db.pow(2).sum()
        return float(val)

    power = sq_err(W, b)
    if power <= 0:
        return 0.0, 0.0
    D_drop = W.clone()
    D_drop[:, keep_cols] = 0  # W - (W_S embedded): the removed columns' contribution
    D_fit = W.clone()
    D_fit[:, keep_cols] -= new_w
    db_fit = None
    if new_b is not None:
        db_fit = new_b.neg() if b is None else b - new_b
    return sq_err(D_drop, None) / power, sq_err(D_fit, db_fit) / power


@dataclass
class TargetStats:
    """What a refit towards other outputs t than the layer's own needs: sum_t t x^T, sum_t t, sum_t ||t||^2."""

    cross: torch.Tensor  # (out, in)
    sum: torch.Tensor  # (out,)
    power: float


def _damped_solve(gram: torch.Tensor, col_sum: torch.Tensor, tokens: int, keep_cols: torch.Tensor, intercept: bool,
                  rhs: torch.Tensor, W_S: torch.Tensor, damp: float, warn, where: str) -> tuple[torch.Tensor, float]:
    """Solve the normal equations [W'_S, b'] A = rhs + lam [W_S, 0], A = G[S,S] bordered by [s_S; n] when the fit
    has an intercept, with the damping lam pulling towards the current weights (raised if A is ill-conditioned)."""
    k = len(keep_cols)

    def build() -> torch.Tensor:  # G[S,S] (one gather: no k x n intermediate), bordered for an intercept
        A = gram[keep_cols[:, None], keep_cols[None, :]]
        if intercept:
            s_S = col_sum[keep_cols]
            A = torch.cat([torch.cat([A, s_S[:, None]], 1),
                           torch.cat([s_S, torch.tensor([float(tokens)], dtype=gram.dtype, device=gram.device)])[None]])
        return A

    scale = damp_scale(gram)
    factor, used_damp = _damped_cholesky(build, k, damp, scale, warn, where)
    rhs = rhs.clone()
    rhs[:, :k] += used_damp * scale * W_S  # the damping pulls towards the current weights
    return torch.cholesky_solve(rhs.t(), factor).t(), used_damp


def _refit_to_target(weight, bias, gram, col_sum, tokens, keep_cols, target: TargetStats, damp, warn, where) -> Refit:
    """min ||t - W'_S x_S - b'||^2 + lam ||W'_S - W_S||^2 over the calibration tokens (b' where the layer has a bias)."""
    if not all(bool(torch.isfinite(v).all()) for v in (gram, col_sum, target.cross, target.sum)):
        raise BonsaiError(f"{where}: non-finite activation statistics (inf/NaN in the calibration forward pass); "
                          "nothing was written. Try --dtype float32 or other calibration data")
    dtype, device = gram.dtype, gram.device
    keep_cols = keep_cols.to(device=device, dtype=torch.long)
    W = weight.detach().to(device=device, dtype=dtype)
    b = None if bias is None else bias.detach().to(device=device, dtype=dtype)
    W_S = W[:, keep_cols]
    k = len(keep_cols)
    has_bias = b is not None or k == 0  # nothing kept: the output is a bias alone
    rhs = target.cross[:, keep_cols]
    if has_bias:
        rhs = torch.cat([rhs, target.sum[:, None]], dim=1)
    sol, used_damp = _damped_solve(gram, col_sum, max(tokens, 1), keep_cols, has_bias, rhs, W_S, damp, warn, where)
    new_w, new_b = (sol[:, :k], sol[:, k]) if has_bias else (sol, None)

    def sq_err(w_S: torch.Tensor, c: torch.Tensor | None) -> float:
        # sum_t ||t - w_S x_S - c||^2 from the statistics
        val = target.power - 2 * (w_S * rhs_cross).sum() + (w_S @ gram_SS * w_S).sum()
        if c is not None:
            val = val - 2 * c @ target.sum + 2 * c @ (w_S @ col_sum[keep_cols]) + tokens * c.pow(2).sum()
        return float(val)

    rhs_cross, gram_SS = target.cross[:, keep_cols], gram[keep_cols[:, None], keep_cols[None, :]]
    power = max(target.power, 1e-30)
    err_drop = max(sq_err(W_S, b), 0.0) / power
    err_fit = max(sq_err(new_w, new_b), 0.0) / power
    return Refit(new_w.to(weight.dtype), None if new_b is None else new_b.to(weight.dtype), err_drop, err_fit, used_damp)
