"""Forward-only reconstruction: after units are removed, refit each layer's output projection.

Every structured method (bonsai and its ablations, llm-pruner, flap) removes units through
`remove_units`, which slices the model and, block by block, refits the output projection of each group
that lost units (o_proj/dense, down_proj/fc2) so that the layer reproduces, on calibration tokens, the
output it had before the removal:

    lstsq: W'_S = W H[:, S] H[S, S]^-1,  H = G + lambda I  (least squares on the kept input columns S, damped
           towards the current weights: it minimises ||W X - W'_S X_S||^2 + lambda ||W'_S - W_S||^2, so with
           every column kept it returns W; the layer's bias is refit jointly where it has one)
    bias : W'_S = W[:, S],  b' = b + W[:, R] mean(x_R)    (FLAP's compensation: the removed columns' mean)
    none : W'_S = W[:, S]                                 (the paper's Bonsai)

with G = X^T X of the projection's full input X over calibration tokens and lambda = damp x mean(diag G).
This is the optimal-brain-surgeon update for removing the columns R (`bonsai.prune.compensation` uses the
same H to score units and to evaluate compensated sub-models).

Statistics are sequential: block i sees hidden states that went through the already pruned
and refit blocks 0..i-1 (captured once at block 0 and carried forward), attention before MLP within a
block, both from the block input when the adapter says the block is parallel (Phi). One layer's Gram
matrix exists at a time, so memory stays at inference level plus the calibration hidden states. A
statistics pass stops each batch once its projections have their inputs (the attention stage never runs the
MLP); one full pass per block then carries the refit block's output forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from bonsai.adapters.base import ATTENTION, MLP, ArchAdapter, GroupKey
from bonsai.baselines.layerwise import as_rows
from bonsai.errors import BonsaiError
from bonsai.hooks import PreHooks
from bonsai.runtime import release_memory

RECONSTRUCT_MODES = ("lstsq", "bias", "none")
REFIT_TARGETS = ("own", "residual")
DEFAULT_DAMP = 1e-2
# Tokens the refit sees per input column of the widest output projection, unless --reconstruct-samples says.
# A Gram matrix estimated from a few tokens per column fits those tokens rather than the text: on SmolLM2 at
# 30%, 5 tokens per column (64 x 128 for an MLP of 1,536) gave 60.2 perplexity and 21 (256 x 128) 57.8, for
# bonsai and FLAP alike (docs/quality.md, row 23).
REFIT_TOKENS_PER_COLUMN = 16


def refit_windows(requested: int | None, calib_samples: int, widest: int, seqlen: int) -> int:
    """Windows of the refit (and of the compensation statistics): `requested` when set, else enough that the
    widest output projection (`widest` input columns) sees REFIT_TOKENS_PER_COLUMN tokens per column, and never
    fewer than the calibration windows."""
    if requested:
        return requested
    return max(calib_samples, -(-REFIT_TOKENS_PER_COLUMN * widest // seqlen))


def widest_projection(adapter: ArchAdapter, groups) -> int:
    """Input columns of the widest output projection among `groups` (0 when there are none)."""
    return max((adapter.output_projection(k).in_features for k in groups), default=0)


WIDE_GRAM = 4096  # input columns beyond which a CPU keeps a layer's Gram matrix in float32 too


def gram_dtype(device: torch.device, width: int = 0) -> torch.dtype:
    """float64 on CPU (exact enough to test against closed forms); float32 on accelerators (fast, and the
    damping keeps the solve well conditioned), and on a CPU for layers wider than WIDE_GRAM columns: LLaMA-3-8B's
    14,336-wide MLP needs 1.6 GB per float64 matrix and the unit errors hold four, which is more than a 2-layer
    model's own weights."""
    return torch.float64 if device.type == "cpu" and width <= WIDE_GRAM else torch.float32


class GramStats(PreHooks):
    """Running G = sum x x^T, s = sum x and n over tokens at the input of some linears (forward pre-hooks)."""

    def __init__(self, linears: dict[GroupKey, nn.Linear]):
        self.gram: dict[GroupKey, torch.Tensor] = {}
        self.sum: dict[GroupKey, torch.Tensor] = {}
        self.tokens: dict[GroupKey, int] = {}
        super().__init__(linears)

    def _hook(self, key: GroupKey, module: nn.Linear, args) -> None:
        x = args[0].detach()
        x = as_rows(x)
        dtype = gram_dtype(x.device, x.shape[-1])
        xd = x.to(dtype)
        if key not in self.gram:
            self.gram[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=dtype, device=x.device)
            self.sum[key] = torch.zeros(x.shape[-1], dtype=dtype, device=x.device)
            self.tokens[key] = 0
        self.gram[key].addmm_(xd.t(), xd)
        self.sum[key] += xd.sum(0)
        self.tokens[key] += x.shape[0]


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
        info = torch.empty((), dtype=torch.int32, device=factor.device)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if int(info) == 0:
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


@dataclass
class RemovalReport:
    """What `remove_units` did, per group it changed: those that lost units (with `--refit-target residual`,
    every group from the first pruned block on, which are all refit)."""

    groups: dict[str, dict] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    added_biases: list[str] = field(default_factory=list)

    def record(self, key: GroupKey, units_before: int, units_after: int, refit: Refit) -> None:
        self.groups[str(key)] = {"units_before": units_before, "units_after": units_after,
                                 "error_dropped": refit.error_dropped, "error_refit": refit.error_refit,
                                 "damp": refit.damp}


def _kept_columns(adapter: ArchAdapter, key: GroupKey, keep: torch.Tensor) -> torch.Tensor:
    width = adapter.unit_width(key)
    keep = keep.sort().values
    return (keep[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


def _apply_refit(adapter: ArchAdapter, key: GroupKey, keep: torch.Tensor, refit: Refit | None,
                 report: RemovalReport) -> None:
    """Slice the group to `keep`, then install the refit output weights (and bias, created if needed)."""
    adapter.slice(key, keep)
    if refit is not None:
        _install(adapter, key, refit, report)


@torch.no_grad()
def remove_units(model: nn.Module, adapter: ArchAdapter, keep: dict[GroupKey, torch.Tensor], windows: torch.Tensor | None,
                 mode: str, damp: float = DEFAULT_DAMP, batch_size: int = 1, progress=None,
                 on_warning: Callable[[str], None] | None = None,
                 on_block: Callable[[int], None] | None = None, target: str = "own",
                 kinds: tuple[str, ...] = (ATTENTION, MLP)) -> RemovalReport:
    """Physically remove every unit not in `keep[group]` (indices into the group's current units) and, unless
    `mode` is none, refit the output projections block by block on `windows` (see module doc). `on_block(i)`
    is called after block i is done. `target` residual (lstsq only) refits every group of `kinds` from the first
    changed block on towards the residual stream of the model as it was (see `_refit_to_residual`)."""
    from bonsai.baselines.layerwise import block_outputs, block_statistics, capture_block_inputs, states_store

    if target not in REFIT_TARGETS:
        raise BonsaiError(f"unknown refit target {target!r}: choose from {', '.join(REFIT_TARGETS)}")
    report = RemovalReport()

    def warn(message: str) -> None:
        report.warnings.append(message)
        if on_warning is not None:
            on_warning(message)

    keep = {k: torch.as_tensor(v, dtype=torch.long).sort().values for k, v in keep.items()}
    todo = {k: v for k, v in keep.items() if len(v) < adapter.group_size(k)}
    if mode == "none" or not todo:
        for key, kept in todo.items():
            adapter.slice(key, kept)
        return report
    if windows is None:
        raise ValueError("reconstruction needs calibration windows")
    if target == "residual" and mode == "lstsq":
        if adapter.residual_scale(0) is not None:
            _refit_to_residual(model, adapter, todo, windows, damp, batch_size, progress, warn, on_block, kinds, report)
            return report
        warn(f"{type(adapter).__name__}: a norm sits between the output projections and the residual stream, so "
             "the refit targets the layers' own outputs (--refit-target own)")
    layers = adapter.layers()
    last = max(k.layer for k in todo)
    inputs = capture_block_inputs(model, layers, windows, batch_size, states_store(model, windows.numel()))
    task = progress.add_task("reconstruction", total=last + 1, info=mode) if progress is not None else None
    for i in range(last + 1):
        block = layers[i]
        here = [GroupKey(i, kind) for kind in (ATTENTION, MLP) if GroupKey(i, kind) in todo]
        stages = [here] if adapter.parallel_block else [[k] for k in here]
        for stage in stages:
            projections = {k: adapter.output_projection(k) for k in stage}
            with GramStats(projections) as stats:  # each batch runs only until its projections have their inputs
                block_statistics(block, inputs, list(projections.values()))
            for key in stage:
                lin = adapter.output_projection(key)
                if key not in stats.gram:  # the projection never ran (cannot happen for a live layer)
                    raise BonsaiError(f"layer {key}: no activations reached its output projection")
                cols = _kept_columns(adapter, key, todo[key])
                refit = refit_projection(lin.weight, lin.bias, stats.gram[key], stats.sum[key], stats.tokens[key],
                                         cols, mode, damp, warn, where=f"layer {key}")
                report.record(key, adapter.group_size(key), len(todo[key]), refit)
                _apply_refit(adapter, key, todo[key], refit, report)
            del stats
        if i < last:
            inputs.hidden = block_outputs(block, inputs)
        release_memory()  # what this block's refit freed goes back before the next block's
        if task is not None:
            progress.advance(task)
        if on_block is not None:
            on_block(i)
    if task is not None:
        progress.remove_task(task)
    return report


def _refit_to_residual(model: nn.Module, adapter: ArchAdapter, todo: dict[GroupKey, torch.Tensor], windows: torch.Tensor,
                       damp: float, batch_size: int, progress, warn: Callable[[str], None],
                       on_block: Callable[[int], None] | None, kinds: tuple[str, ...], report: RemovalReport) -> None:
    """Refit towards the residual stream of the model as it was before this removal (`--refit-target residual`).

    The own-output refit makes each layer reproduce what *it* output before, on inputs that have already drifted;
    the drift of the earlier layers is never undone. Here two streams run side by side, block by block: the
    reference (the model as it was, on its own hidden states) and the pruned, refit one. A sub-layer adds
    m * (W x + b) to the residual stream r (m: the family's residual scale); its projection is fit to

        t = y_ref + (r_ref - r) / m,   y_ref = the reference projection's output on the reference's input,

    so that after it the pruned stream's residual equals the reference's as nearly as least squares allows:
    every group of `kinds` from the first changed block on is refit, pruned or not, on its kept columns, and the
    drift the refit cannot remove passes on to the next sub-layer's target. r before the attention is the block
    input; before the MLP it adds m times the attention projection's output (also in a parallel block, whose MLP
    reads the block input: the two stages then split the block's residual).

    The reference needs no copy of the model: when block i's turn comes nothing in it has changed yet, so one
    pass of block i over the reference states records both projections' outputs and the next reference states
    before anything is refit. Cost per block: that pass, plus the pruned stream's two partial passes (to each
    projection) and its output. Memory: the reference's states and its two projections' outputs beside the
    own-output refit's states (in host memory on an accelerator once they are large, as there).
    """
    from bonsai.baselines.layerwise import capture_block_inputs, outputs_of, states_store

    layers = adapter.layers()
    first = min(k.layer for k in todo)
    store = states_store(model, windows.numel(), copies=6)
    inputs = capture_block_inputs(model, layers, windows, batch_size, store)
    for i in range(first):  # unchanged blocks: both streams are the same
        inputs.hidden = outputs_of(layers[i], inputs.hidden, inputs.kwargs_for(layers[i]), store)
    reference = list(inputs.hidden)
    task = progress.add_task("reconstruction", total=len(layers) - first, info="lstsq, residual target") \
        if progress is not None else None
    for i in range(first, len(layers)):
        block = layers[i]
        kwargs = inputs.kwargs_for(block)
        m = float(adapter.residual_scale(i))
        attention_out = adapter.output_projection(GroupKey(i, ATTENTION))  # slicing keeps the module objects
        mlp_out = adapter.output_projection(GroupKey(i, MLP))
        ref_attention, ref_mlp, ref_next = _reference_pass(block, attention_out, mlp_out, reference, kwargs, store)
        for kind in (ATTENTION, MLP):
            key = GroupKey(i, kind)
            if kind not in kinds or kind in adapter.unprunable:
                continue
            lin, prev, ref_out, ref_prev = ((attention_out, None, ref_attention, None) if kind == ATTENTION
                                            else (mlp_out, attention_out, ref_mlp, ref_attention))
            gram, col_sum, tokens, target = _residual_statistics(block, lin, prev, inputs.hidden, reference, ref_out,
                                                                 ref_prev, kwargs, m)
            cols = _kept_columns(adapter, key, todo[key]) if key in todo else torch.arange(lin.in_features)
            refit = refit_projection(lin.weight, lin.bias, gram, col_sum, tokens, cols, "lstsq", damp, warn,
                                     where=f"layer {key}", target=target)
            report.record(key, adapter.group_size(key), len(todo[key]) if key in todo else adapter.group_size(key), refit)
            if key in todo:
                _apply_refit(adapter, key, todo[key], refit, report)
            else:
                _install(adapter, key, refit, report)
        if i < len(layers) - 1:
            inputs.hidden = outputs_of(block, inputs.hidden, kwargs, store)
        reference = ref_next
        del ref_attention, ref_mlp
        release_memory()  # what this block's refit freed goes back before the next block's
        if task is not None:
            progress.advance(task)
        if on_block is not None:
            on_block(i)
    if task is not None:
        progress.remove_task(task)


@torch.no_grad()
def _reference_pass(block: nn.Module, attention_out: nn.Linear, mlp_out: nn.Linear, hidden: list[torch.Tensor],
                    kwargs: list[dict], store) -> tuple[list, list, list]:
    """`block`, not yet refit, on the reference stream: per batch its attention and MLP output projections'
    outputs and the block's output (the next block's reference input)."""
    from bonsai.baselines.layerwise import outputs_of, stash

    attention, mlp = [], []

    def keep(into: list):
        return lambda mod, args, out: into.append(stash(out, store))

    handles = [attention_out.register_forward_hook(keep(attention)), mlp_out.register_forward_hook(keep(mlp))]
    try:
        out = outputs_of(block, hidden, kwargs, store)
    finally:
        for handle in handles:
            handle.remove()
    return attention, mlp, out


def _install(adapter: ArchAdapter, key: GroupKey, refit: Refit, report: RemovalReport) -> None:
    """Install refit output weights (and bias, created if the layer has none) into the group's projection."""
    lin = adapter.output_projection(key)
    with torch.no_grad():
        lin.weight.copy_(refit.weight.to(lin.weight.device))
        if refit.bias is not None:
            if lin.bias is None:
                adapter.add_output_bias(key)
                report.added_biases.append(str(key))
            lin.bias.copy_(refit.bias.to(lin.bias.device))


@torch.no_grad()
def _residual_statistics(block: nn.Module, lin: nn.Linear, prev: nn.Linear | None, hidden: list[torch.Tensor],
                         reference: list[torch.Tensor], ref_out: list[torch.Tensor], ref_prev: list[torch.Tensor] | None,
                         kwargs: list[dict], m: float) -> tuple[torch.Tensor, torch.Tensor, int, TargetStats]:
    """G, s, n of `lin`'s input in the pruned stream and the target statistics of `_refit_to_residual`, batch by
    batch: the pruned block runs only as far as `lin`; `ref_out` (and `ref_prev`, the reference attention output
    that `prev`'s output is compared with before the MLP) come from `_reference_pass`."""
    from bonsai.baselines.layerwise import run_until

    seen: dict[str, torch.Tensor] = {}
    handles = [lin.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))]
    if prev is not None:
        handles.append(prev.register_forward_hook(lambda mod, args, out: seen.__setitem__("prev", out.detach())))
    gram = col_sum = cross = t_sum = None
    power, tokens = 0.0, 0
    try:
        for b, (h, h_ref, kw) in enumerate(zip(hidden, reference, kwargs, strict=True)):
            seen.clear()
            run_until(block, h, kw, lin)
            x = as_rows(seen["x"])
            dtype = gram_dtype(x.device, x.shape[1])
            x = x.to(dtype)
            t = _rows_like(ref_out[b], x) + (_rows_like(h_ref, x) - _rows_like(h, x)) / m
            if prev is not None:
                t += _rows_like(ref_prev[b], x) - _rows_like(seen["prev"], x)
            if gram is None:
                gram = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
                col_sum = torch.zeros(x.shape[1], dtype=dtype, device=x.device)
                cross = torch.zeros(t.shape[1], x.shape[1], dtype=dtype, device=x.device)
                t_sum = torch.zeros(t.shape[1], dtype=dtype, device=x.device)
            gram.addmm_(x.t(), x)
            col_sum += x.sum(0)
            cross.addmm_(t.t(), x)
            t_sum += t.sum(0)
            power += float(t.pow(2).sum())
            tokens += x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    return gram, col_sum, tokens, TargetStats(cross, t_sum, power)


def _rows_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` as rows of tokens on `like`'s device and in its dtype."""
    return as_rows(t.to(like.device)).to(like.dtype)
