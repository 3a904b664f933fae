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
This is the optimal-brain-surgeon update for removing the columns R (`bonsai.engine.compensation` uses the
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
from bonsai.engine import spill
from bonsai.engine.blocks import as_rows, block_outputs, block_statistics, capture_block_inputs, outputs_of, run_until
from bonsai.engine.refit import DEFAULT_DAMP, REFIT_TARGETS, Refit, TargetStats, refit_projection
from bonsai.engine.statistics import GramStats, gram_dtype
from bonsai.errors import BonsaiError
from bonsai.runtime import release_memory

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
    inputs = capture_block_inputs(model, layers, windows, batch_size, spill.states_store(model, windows.numel()))
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
        _block_done(i, progress, task, on_block)
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

    layers = adapter.layers()
    first = min(k.layer for k in todo)
    store = spill.states_store(model, windows.numel(), copies=6)
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
        _block_done(i, progress, task, on_block)
    if task is not None:
        progress.remove_task(task)


@torch.no_grad()
def _reference_pass(block: nn.Module, attention_out: nn.Linear, mlp_out: nn.Linear, hidden: list[torch.Tensor],
                    kwargs: list[dict], store) -> tuple[list, list, list]:
    """`block`, not yet refit, on the reference stream: per batch its attention and MLP output projections'
    outputs and the block's output (the next block's reference input)."""

    attention, mlp = [], []

    def keep(into: list):
        return lambda mod, args, out: into.append(spill.stash(out, store))

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


def _block_done(i: int, progress, task, on_block: Callable[[int], None] | None) -> None:
    """After block i's refit: what it freed goes back before the next block's, the bar moves, the hook runs."""
    release_memory()
    if task is not None:
        progress.advance(task)
    if on_block is not None:
        on_block(i)
