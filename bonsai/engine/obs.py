"""Structured optimal brain surgeon on one output projection: the compensated error of removing each unit,
alone or along a greedy sequential path, from H^-1 with H = G + lambda I (`bonsai.engine.compensation` turns
these into scores and compensated sub-models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bonsai.engine.linalg import cholesky_, cholesky_inverse_

if TYPE_CHECKING:
    from bonsai.engine.spill import SpilledTensor


def centred_gram(gram: torch.Tensor, col_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """G - n mu mu^T: the Gram matrix about the mean, what is left to explain once a bias takes the mean."""
    return gram - torch.outer(col_sum, col_sum) / max(tokens, 1)


def damped_inverse(gram: torch.Tensor, damp: float, scale: float | None = None) -> torch.Tensor:
    """(G + damp * scale I)^-1 through Cholesky (scale: mean(diag G) unless given), raising the damping until it
    is positive definite."""
    n = gram.shape[0]
    if scale is None:
        scale = float(gram.diagonal().mean()) if n else 1.0
    scale = scale if scale > 0 else 1.0
    d = damp

    def damped(amount: float) -> torch.Tensor:
        h = gram.clone()
        h.diagonal().add_(amount)
        return h

    for _ in range(8):
        h = damped(d * scale)
        if cholesky_(h):  # factor and inverse in h's own memory: one n x n matrix beside G (`engine.linalg`)
            return cholesky_inverse_(h)
        d = max(d * 10, 1e-6)
    return torch.linalg.pinv(damped(d * scale))


def obs_unit_errors(weight: torch.Tensor, hinv: torch.Tensor, width: int) -> torch.Tensor:
    """e_u = tr(W_u [(H^-1)_uu]^-1 W_u^T) for every unit u of `width` consecutive columns."""
    W = weight.detach().to(hinv.dtype)
    n_units = W.shape[1] // width
    if n_units == 0:
        return torch.zeros(0, dtype=hinv.dtype)
    if width == 1:
        return (W.pow(2).sum(0) / hinv.diagonal().clamp_min(1e-30)).cpu()
    idx = torch.arange(W.shape[1], device=hinv.device).view(n_units, width)
    blocks = hinv[idx[:, :, None], idx[:, None, :]]  # (units, w, w)
    Wu = W.t().reshape(n_units, width, -1)  # (units, w, out)
    sol = torch.linalg.solve(blocks, Wu)  # [(H^-1)_uu]^-1 W_u^T
    return (Wu * sol).sum((1, 2)).cpu()


def greedy_obs_path(weight: torch.Tensor, hinv: torch.Tensor, width: int, steps: int, in_place: bool = False
                    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Sequential OBS (as ZipLM and OSSCAR do): remove the unit whose compensated error is smallest, update W
    and H^-1 as if it were gone, repeat `steps` times. Returns the units in removal order, their marginal
    errors (which add up to the compensated error of removing each prefix at once) and every unit's error
    once the path is gone (0 for the path's own). `in_place`: one-column units work on `hinv` itself (left
    changed) instead of a copy, one n x n matrix less (the caller keeps what it needs of H^-1 elsewhere)."""
    if width == 1:
        return _greedy_channels(weight, hinv, steps, in_place)
    return _greedy_units(weight, hinv, width, steps)


def _greedy_units(weight: torch.Tensor, hinv: torch.Tensor, width: int, steps: int
                  ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """`greedy_obs_path` with W and H^-1 updated explicitly after every step (any unit width)."""
    W = weight.detach().to(hinv.dtype).clone()
    H = hinv.clone()
    n_units = W.shape[1] // width
    alive = torch.ones(n_units, dtype=torch.bool, device=hinv.device)
    idx = torch.arange(W.shape[1], device=hinv.device).view(n_units, width)

    def errors() -> torch.Tensor:
        if width == 1:
            return W.pow(2).sum(0) / H.diagonal().clamp_min(1e-30)
        blocks = H[idx[:, :, None], idx[:, None, :]]
        Wu = W.t().reshape(n_units, width, -1)
        return (Wu * torch.linalg.solve(blocks, Wu)).sum((1, 2))

    order, marginal = [], []
    for _ in range(min(steps, n_units)):
        e = errors().masked_fill(~alive, float("inf"))
        u = int(torch.argmin(e))
        order.append(u)
        marginal.append(e[u])
        alive[u] = False
        cols = idx[u]
        if width == 1:  # rank-one downdates, in place (H^-1 is symmetric)
            h = H[:, u].clone()
            W.addr_(W[:, u].clone(), h, alpha=-1.0 / float(h[u]))
            H.addr_(h, h, alpha=-1.0 / float(h[u]))
        else:
            M = torch.linalg.solve(H[cols][:, cols], H[cols])  # [(H^-1)_RR]^-1 (H^-1)_R,:
            W -= W[:, cols] @ M
            H -= H[:, cols] @ M
        W[:, cols] = 0
        H[cols] = 0
        H[:, cols] = 0
        H[cols, cols] = 1.0  # a removed unit's identity block keeps every later solve well posed
    rest = errors().masked_fill(~alive, 0.0)
    return order, torch.stack(marginal).cpu() if marginal else torch.zeros(0, dtype=hinv.dtype), rest.cpu()


OBS_BLOCK = 64  # greedy steps between the deferred updates of `_greedy_channels`


def _greedy_channels(weight: torch.Tensor, hinv: torch.Tensor, steps: int, in_place: bool = False
                     ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """`greedy_obs_path` for one-column units (MLP channels), with the updates deferred.

    Removing channel u updates H^-1 by -h h^T / h_u (h its column) and W by -W_u h^T / h_u: two passes over n^2 and
    out x n numbers per step, all memory traffic (1,229 steps of a 2,048-wide MLP: 3-4 s a layer on a CPU; hours at
    LLaMA-2-7B's 11,008). Only the errors c_j / d_j are needed, with c = diag(W^T W) and d = diag(H^-1), so the
    path keeps K = W^T W instead of W and applies the rank-one (H^-1) and rank-two (K) updates in blocks of
    OBS_BLOCK steps as matrix products; between two blocks a step reads one row of each through the pending
    updates (n x block) and updates c and d in O(n). Same path, errors and result as the explicit updates, up to
    rounding."""
    H = hinv if in_place else hinv.clone()
    W = weight.detach().to(hinv.dtype)
    K = W.t() @ W
    n = H.shape[0]
    d, c = H.diagonal().clone(), K.diagonal().clone()
    U, G = H.new_zeros(n, OBS_BLOCK), H.new_zeros(n, OBS_BLOCK)
    q = H.new_zeros(OBS_BLOCK)
    alive = torch.ones(n, dtype=torch.bool, device=H.device)
    order, marginal, k = [], [], 0

    def flush() -> None:
        nonlocal k, d, c
        if k:  # in place: no n x n temporaries (three of them were a third of Gemma-3-270M's memory budget)
            Uk, Gk = U[:, :k], G[:, :k]
            H.addmm_(Uk, Uk.t(), alpha=-1.0)
            K.addmm_(Uk, Gk.t(), alpha=-1.0)
            K.addmm_(Gk, Uk.t(), alpha=-1.0)
            K.addmm_(Uk * q[:k], Uk.t())
            d, c = H.diagonal().clone(), K.diagonal().clone()  # back in step with the matrices (no drift)
        k = 0

    for _ in range(min(steps, n)):
        e = (c / d.clamp_min(1e-30)).masked_fill(~alive, float("inf"))
        u = int(torch.argmin(e))
        order.append(u)
        marginal.append(e[u])
        alive[u] = False
        Uk, Gk, qk = U[:, :k], G[:, :k], q[:k]
        h = H[u] - Uk @ Uk[u]  # row u of H^-1 as it is now (symmetric: its column)
        kr = K[u] - Gk @ Uk[u] - Uk @ Gk[u] + Uk @ (qk * Uk[u])  # row u of W^T W as it is now
        scale = float(h[u]).__abs__() ** 0.5 or 1.0
        un = h / scale  # the rank-one factor: H^-1 -= un un^T
        g = kr / scale  # W^T v with v = W_u / sqrt(h_u): K -= un g^T + g un^T - |v|^2 un un^T
        vv = float(kr[u]) / scale ** 2
        c = (c - 2 * un * g + un * un * vv).clamp_min(0)
        d = d - un * un
        U[:, k], G[:, k], q[k] = un, g, vv
        k += 1
        if k == OBS_BLOCK:
            flush()
    flush()
    rest = (c / d.clamp_min(1e-30)).masked_fill(~alive, 0.0)
    return order, torch.stack(marginal).cpu() if marginal else torch.zeros(0, dtype=hinv.dtype), rest.cpu()


def sequential_obs_errors(weight: torch.Tensor, hinv: torch.Tensor, width: int, steps: int,
                          in_place: bool = False) -> torch.Tensor:
    """Unit errors that rank a group's units along its greedy joint removal (`greedy_obs_path`): units alone
    are not additive (two correlated units can each stand in for the other). On the path: the running maximum
    of the marginal errors, so that ranking by it follows the path; off it: the error once the path is gone,
    never below the path's last value."""
    order, marginal, rest = greedy_obs_path(weight, hinv, width, steps, in_place)
    out = rest.clone()
    if order:
        level = torch.cummax(marginal, 0).values
        out[torch.tensor(order)] = level
        off = torch.ones(len(out), dtype=torch.bool)
        off[torch.tensor(order)] = False
        out[off] = torch.maximum(rest[off], level[-1] * (1 + 1e-9))
    return out


def direct_unit_errors(weight: torch.Tensor, gram: torch.Tensor, width: int) -> torch.Tensor:
    """e_u = tr(W_u G_uu W_u^T): the output energy unit u carries, lost when it is zeroed and nothing is refit."""
    W = weight.detach().to(gram.dtype)
    n_units = W.shape[1] // width
    if n_units == 0:
        return torch.zeros(0, dtype=gram.dtype)
    idx = torch.arange(W.shape[1], device=gram.device).view(n_units, width)
    blocks = gram[idx[:, :, None], idx[:, None, :]]  # (units, w, w)
    Wu = W.t().reshape(n_units, width, -1)  # (units, w, out)
    return (Wu * (blocks @ Wu)).sum((1, 2)).cpu()


def unit_errors(weight: torch.Tensor, gram: torch.Tensor, col_sum: torch.Tensor, tokens: int, width: int,
                refit: str, hinv: torch.Tensor | None, sequential: int = 0, in_place: bool = False) -> torch.Tensor:
    """Each unit's output error once removed alone, under the run's reconstruction (see module doc); with
    `sequential` > 0 and the lstsq refit, along the greedy joint removal of that many units (`in_place`: on `hinv`
    itself, left changed)."""
    if refit == "lstsq":
        if sequential:
            return sequential_obs_errors(weight, hinv, width, sequential, in_place)
        return obs_unit_errors(weight, hinv, width)
    if refit == "bias":  # the mean is folded into the bias: only the fluctuation around it is lost
        gram = centred_gram(gram, col_sum, tokens)
    return direct_unit_errors(weight, gram, width)


SET_ASIDE_FILE_BYTES = 32 * 2**20  # on a CPU, an H^-1 set aside past this size waits in a file (`set_aside`)


def set_aside(hinv: torch.Tensor, spill) -> torch.Tensor | SpilledTensor:
    """A copy of H^-1 outside the working memory, to take columns from once the original has been used up:
    in host memory when it lives on an accelerator, in a temporary file (`spill`, a SpillStore) on a CPU once it
    is large, else a plain copy."""
    if hinv.device.type != "cpu":
        return hinv.cpu()
    if spill is not None and hinv.numel() * hinv.element_size() >= SET_ASIDE_FILE_BYTES:
        return spill.put(hinv)
    return hinv.clone()


def columns_of(source: torch.Tensor | SpilledTensor, cols: torch.Tensor) -> torch.Tensor:
    """source[:, cols] in host memory; a spilled matrix is read a block of rows at a time."""
    if isinstance(source, torch.Tensor):
        return source[:, cols.to(source.device)].cpu()
    return source.columns(cols)
