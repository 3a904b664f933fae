"""Compensated unit errors and compensated sub-models: selection that sees the refit coming.

The refit of `bonsai.reconstruct` changes which units matter: a unit whose output the others can take
over costs little once the output projection is refit, however large its activations. Two things here
measure units *after* compensation, from the Gram matrix G of each output projection's input (forward
passes only):

* the compensated error of removing unit u alone (structured optimal brain surgeon, with H = G + lambda I):
      e_u = tr(W_u [(H^-1)_uu]^-1 W_u^T)           (W_u: the unit's columns of the output projection)
  expressed relative to the power of the residual stream entering the block, so that groups of different
  layers are on one scale. A run that will not refit (`--reconstruct none`) or only fold the mean into the
  bias (`bias`) scores a unit by the error it leaves then: tr(W_u G_uu W_u^T) with G uncentred or centred
  (the covariance), since no other column will take its output over;
* compensated sub-models: when the units R of a group are dropped, the optimal update of the remaining
  weights is  W' = W - W_R [(H^-1)_RR]^-1 (H^-1)_R,:  (its columns R are zero), so a sub-model's output
  projection computes  W x - (x M_R^T) W_R^T  with  M_R = [(H^-1)_RR]^-1 (H^-1)_R,: . Only the candidates'
  columns of H^-1 are kept, and the correction is a low-rank term per batch row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from bonsai.adapters.base import ATTENTION, MLP, ArchAdapter, GroupKey
from bonsai.errors import BonsaiError
from bonsai.reconstruct import DEFAULT_DAMP, GramStats, damp_scale, gram_dtype
from bonsai.runtime import release_memory

if TYPE_CHECKING:
    from bonsai.baselines.layerwise import SpilledTensor


# per group: (H^-1[:, C], C, mean input or None), see group_statistics and CompensatedMasks
Inverse = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
# The probes' corrections M_R kept for the next windows of the same sub-model. A probe of p_iter 0.3 drops 60%
# of an MLP: M_R is then 6,605 x 11,008 float32 (290 MB) at LLaMA-2-7B shape, so the cache is bounded by bytes
# (rows of one batch belong to one or two sub-models: a handful of entries is all that is ever reused), at most
# CORRECTION_CACHE_SHARE of the model's own memory (the newest entry always stays).
CORRECTION_CACHE_BYTES = 1 << 30
CORRECTION_CACHE_SHARE = 0.05


def centred_gram(gram: torch.Tensor, col_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """G - n mu mu^T: the Gram matrix about the mean, what is left to explain once a bias takes the mean."""
    return gram - torch.outer(col_sum, col_sum) / max(tokens, 1)


@dataclass
class GroupStats:
    """What one group's Gram matrix says about its units (current model, calibration windows)."""

    unit_error: torch.Tensor  # (units,) compensated error of removing each unit alone, relative to residual power


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

    info = torch.empty((), dtype=torch.int32, device=gram.device)
    for _ in range(8):
        h = damped(d * scale)
        torch.linalg.cholesky_ex(h, out=(h, info))  # factor and inverse in place: one n x n matrix beside G
        if int(info) == 0:
            return torch.cholesky_inverse(h, out=h)
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


@torch.no_grad()
def group_statistics(model: nn.Module, adapter: ArchAdapter, groups: list[GroupKey], windows: torch.Tensor,
                     batch_size: int, damp: float = DEFAULT_DAMP, keep_inverse: bool = False, refit: str = "lstsq",
                     sequential: Callable[[GroupKey], int] | None = None,
                     columns: Callable[[GroupKey, torch.Tensor], torch.Tensor] | None = None, progress=None
                     ) -> tuple[dict[GroupKey, GroupStats], dict[GroupKey, Inverse]]:
    """Unit errors of every group under the `refit` to come (compensated for lstsq), block by block on the
    current model (one Gram matrix at a time). With `keep_inverse`, also return per group (H^-1[:, C], C, mean):
    `columns(group, unit_errors)` picks the columns C to keep (default: all), so that only those outlive the
    group's turn (at 7B a whole H^-1 is ~0.5 GB per layer); mean is the input's mean where the layer has a
    bias (the lstsq refit fits it jointly, so errors and compensation are on the covariance), else None.
    `sequential(group)`: units to order by sequential OBS (0: each unit alone)."""
    from bonsai.baselines.layerwise import block_outputs, capture_block_inputs, states_store

    from bonsai.baselines.layerwise import HOST_STATES_SHARE, SpillStore, stash

    layers = adapter.layers()
    wanted = {k.layer for k in groups}
    inputs = capture_block_inputs(model, layers, windows, batch_size, states_store(model, windows.numel()))
    # the kept columns wait for the probes in host memory; on a CPU (where that is the memory) in a temporary file
    # once they pass HOST_STATES_SHARE of the model's memory (0.5 GB at Gemma-3-270M shape, 1.9x its budget)
    budget = HOST_STATES_SHARE * sum(p.numel() * p.element_size() for p in model.parameters())
    spill = SpillStore() if next(model.parameters()).device.type == "cpu" else None
    held = 0
    stats: dict[GroupKey, GroupStats] = {}
    inverses: dict[GroupKey, Inverse] = {}
    n_blocks = max(wanted) + 1 if wanted else 0
    task = progress.add_task("unit errors", total=n_blocks, info="Gram, block by block") if progress is not None else None
    for i in range(n_blocks):
        here = [k for k in groups if k.layer == i and adapter.group_size(k) > 0]
        if here:
            residual = sum(float(h.to(gram_dtype(h.device)).pow(2).sum()) for h in inputs.hidden)
            residual = residual if residual > 0 else 1.0
            with GramStats({k: adapter.output_projection(k) for k in here}) as grams:
                outputs = block_outputs(layers[i], inputs)
            for key in here:
                if not all(bool(torch.isfinite(row).all()) for row in grams.gram[key].split(1024)):
                    raise BonsaiError(f"layer {key}: non-finite activation statistics (inf/NaN in the calibration forward "
                                      "pass); nothing was written. Try --dtype float32 or other calibration data")
                raw, mean = grams.gram.pop(key), None  # popped: freed as soon as nothing below needs it
                gram = raw
                lin = adapter.output_projection(key)
                if refit == "lstsq" and lin.bias is not None:  # the refit fits the bias jointly: it takes the mean
                    mean = grams.sum[key] / max(grams.tokens[key], 1)
                    gram = centred_gram(gram, grams.sum[key], grams.tokens[key])
                hinv = None
                if refit == "lstsq" or keep_inverse:  # damped as the refit is, relative to the raw Gram's diagonal
                    hinv = damped_inverse(gram, damp, damp_scale(raw))
                if refit == "lstsq":  # its unit errors need H^-1 alone
                    del gram
                    gram = raw = None
                steps = sequential(key) if sequential is not None else 0
                # one-column units along sequential OBS work on H^-1 itself, one n x n matrix less (LLaMA-3-8B's
                # MLP: 0.8 GB); what the probes need of the original waits outside the working memory
                consume = keep_inverse and refit == "lstsq" and steps > 0 and adapter.unit_width(key) == 1
                original = set_aside(hinv, spill) if consume else None
                err = unit_errors(lin.weight, raw, grams.sum[key], grams.tokens[key], adapter.unit_width(key), refit,
                                  hinv, steps, in_place=consume)
                if consume:
                    hinv = None  # used up by the path
                stats[key] = GroupStats(unit_error=(err / residual).double())
                if keep_inverse:
                    cols = columns(key, stats[key].unit_error) if columns is not None else torch.arange(lin.in_features)
                    # held for the whole iteration (0.6 x n^2 floats per group at p_iter 0.3): in host memory, so
                    # the accelerator keeps inference-level memory; each probe moves its own columns over
                    kept = columns_of(original if consume else hinv, cols)
                    held += kept.numel() * kept.element_size()
                    if spill is not None and held > budget:
                        kept = stash(kept, spill)
                    inverses[key] = (kept, cols, None if mean is None else mean.cpu())
                del hinv, gram, raw, original
            del grams
        else:
            outputs = block_outputs(layers[i], inputs)
        for key in groups:
            if key.layer == i and key not in stats:
                stats[key] = GroupStats(unit_error=torch.zeros(0, dtype=torch.float64))
        inputs.hidden = outputs
        release_memory()  # what this block's statistics freed goes back before the next block's
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return stats, inverses


class CompensatedMasks:
    """Sub-models whose dropped units are compensated by the optimal update of the remaining weights.

    Forward hooks on each group's output projection subtract the low-rank term (x M_R^T) W_R^T per batch
    row, R being the row's dropped candidate columns (see module doc); rows may belong to different
    sub-models. `set` takes, per group, a (rows, candidate units) 0/1 keep matrix over the candidates.
    """

    def __init__(self, adapter: ArchAdapter, inverses: dict[GroupKey, Inverse]):
        """`inverses[group]` = (H^-1[:, C], C, mean) with C the candidate columns in candidate-unit order and
        mean the input's mean when the layer has a bias (None otherwise): the optimal update then also moves the
        bias by W_R M_R mean, so the term acts on x - mean."""
        self.adapter = adapter
        self.inverses = inverses
        model_bytes = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
        self.cache_bytes = min(CORRECTION_CACHE_BYTES, CORRECTION_CACHE_SHARE * model_bytes)
        self._keep: dict[GroupKey, torch.Tensor] = {}
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}  # oldest first
        self._handles = [adapter.output_projection(k).register_forward_hook(partial(self._hook, k)) for k in inverses]

    def set(self, keep: dict[GroupKey, torch.Tensor]) -> None:
        self._keep = {k: torch.as_tensor(v).bool() for k, v in keep.items()}

    def clear(self) -> None:
        """Every group back to the model as it is (until the next `set`)."""
        self._keep = {}

    def _correction(self, key: GroupKey, dropped_units: tuple[int, ...]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(M_R, W_R, M_R mean or None) for the dropped candidate units, cached for the sub-model's next windows."""
        cache_key = (key, dropped_units)
        if cache_key in self._cache:
            self._cache[cache_key] = self._cache.pop(cache_key)  # most recently used last
            return self._cache[cache_key]
        hinv_c, cols, mean = self.inverses[key]
        hinv_c = hinv_c.to("cpu") if not isinstance(hinv_c, torch.Tensor) else hinv_c  # spilled to a file (CPU runs)
        W = self.adapter.output_projection(key).weight
        width = self.adapter.unit_width(key)
        pos = (torch.tensor(dropped_units)[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
        pos = pos.to(hinv_c.device)
        R = cols.to(hinv_c.device)[pos]
        dev = W.device  # the solve runs where the layer runs; H^-1's columns wait in host memory
        h_RR = hinv_c[R][:, pos].to(dev)  # (H^-1)_RR
        M = torch.linalg.solve(h_RR, hinv_c[:, pos].t().to(dev))  # [(H^-1)_RR]^-1 (H^-1)_R,:
        # float32 whatever the model dtype: the term cancels the dropped columns' share of W x
        shift = None if mean is None else (M @ mean.to(dev, M.dtype)).float()  # M_R mean
        entry = (M.float(), W[:, R.to(W.device)].float(), shift)
        del M
        size = lambda e: sum(t.numel() * t.element_size() for t in e if t is not None)  # noqa: E731
        total = size(entry) + sum(size(e) for e in self._cache.values())
        while self._cache and total > self.cache_bytes:
            total -= size(self._cache.pop(next(iter(self._cache))))
        self._cache[cache_key] = entry
        return entry

    def _hook(self, key: GroupKey, module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
        keep = self._keep.get(key)
        if keep is None:
            return output
        x = args[0]
        out = output.clone()
        rows = keep if keep.dim() == 2 else keep[None].expand(x.shape[0], -1)
        for r in range(x.shape[0]):
            dropped = tuple((~rows[r]).nonzero().flatten().tolist())
            if not dropped:
                continue
            M, W_R, shift = self._correction(key, dropped)
            z = x[r].to(M.dtype) @ M.t()
            if shift is not None:
                z = z - shift
            out[r] -= (z @ W_R.t()).to(out.dtype)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()

    def __enter__(self) -> CompensatedMasks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


__all__ = ["ATTENTION", "MLP", "CompensatedMasks", "GroupStats", "Inverse", "centred_gram", "direct_unit_errors",
           "group_statistics",
           "greedy_obs_path", "obs_unit_errors", "sequential_obs_errors", "unit_errors"]
