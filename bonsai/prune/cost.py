"""What a prune run will cost, before it starts: forward tokens, time from a timing probe, peak memory.

Per iteration a run spends, in forward-pass tokens (C: calibration tokens, R: refit tokens):
  prior pass                       C
  unit errors, block by block      R       (probe selection, the obs prior, or compensated sub-models)
  sub-models                       n x C   (probe: 2 x layers x depths; paper: --samples)
                                   a probe of layer i runs blocks i.. and the head only (`prune.prefix`): on
                                   average (L+1)/2L of the blocks, plus one pass to advance the kept states
  refit, block by block            3 x R   (2 x R for a parallel block; 0 with --reconstruct none)
                                   4 x R with --refit-target residual: one pass of each block over the
                                   reference stream (before its refit) beside the pruned stream's three
A forward costs in proportion to the parameters left, which shrink by p_iter each iteration. The seconds per
token come from timing one batch on the actual device and dtype; the Gram solves (milliseconds to a second
per layer) and the regression (paper selection) are left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bonsai.baselines.layerwise import states_store
from bonsai.prune.compensation import CORRECTION_CACHE_BYTES
from bonsai.prune.config import PruneConfig
from bonsai.reconstruct import refit_windows, widest_projection


@dataclass
class CostEstimate:
    iterations: int
    sub_models_per_iteration: int
    forward_tokens: float  # parameter-weighted: a token through the pruned model counts as its fraction
    seconds_per_token: float
    seconds: float
    probe_peak_bytes: int
    extra_bytes: int  # beyond the probe batch: refit hidden states, one Gram matrix, compensation columns
    at_most: bool = False  # adaptive sampling: the sub-models (and the time) are a maximum

    @property
    def peak_bytes(self) -> int:
        return self.probe_peak_bytes + self.extra_bytes

    def line(self) -> str:
        most = "at most " if self.at_most else ""
        return (f"estimate: {self.iterations} iterations x {most}{self.sub_models_per_iteration} sub-models, "
                f"{self.forward_tokens / 1e6:.1f}M forward tokens, ~{most}{_duration(self.seconds)} on this device, "
                f"peak memory ~{self.peak_bytes / 2**30:.1f} GiB")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def sub_models_per_iteration(cfg: PruneConfig, num_groups: int) -> int:
    if cfg.method not in ("bonsai", "no-regression"):
        return 0
    return num_groups * cfg.probe_depths if cfg.selection == "probe" else cfg.samples


@torch.no_grad()
def estimate(cfg: PruneConfig, model, adapter, groups, seqlen: int, iterations: int, parallel_block: bool) -> CostEstimate:
    """Time one calibration batch (after a warm-up) and extrapolate to the whole run."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    batch = torch.randint(0, vocab, (cfg.batch_size, seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model(batch[:1, : min(seqlen, 16)], use_cache=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    model(batch, use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds_per_token = (time.perf_counter() - start) / batch.numel()
    from bonsai.runtime import peak_memory

    probe_peak = peak_memory(device)
    C = cfg.calib_samples * seqlen
    widest = widest_projection(adapter, groups)
    R = refit_windows(cfg.reconstruct_samples, cfg.calib_samples, widest, seqlen) * seqlen
    n_sub = sub_models_per_iteration(cfg, len(groups))
    gram = cfg.selection == "probe" or cfg.prior == "obs" or (cfg.compensate and n_sub)
    residual = cfg.refit_target == "residual" and cfg.reconstruct == "lstsq" and adapter.residual_scale(0) is not None
    refit = 0 if cfg.reconstruct == "none" else (2 if parallel_block else 3) + (1 if residual else 0)
    probe_share, advance = 1.0, 0
    if cfg.selection == "probe" and n_sub:  # each probe starts at its own block
        layers, head = adapter.num_layers, vocab * model.config.hidden_size
        blocks = adapter.block_parameters()
        probe_share = (head + blocks * (layers + 1) / (2 * layers)) / (head + blocks)
        advance = C
    tokens = 0.0
    for t in range(iterations):
        left = 1.0 - cfg.sparsity * t / iterations  # the share of block parameters still there
        tokens += left * (C + (R if gram else 0) + n_sub * C * probe_share + advance + refit * R)
    dtype_bytes = next(model.parameters()).element_size()
    gram_bytes = 2 * widest * widest * (8 if device.type == "cpu" else 4)
    hidden = model.config.hidden_size
    # a block's input and output states over the refit windows; in host memory when large on an accelerator,
    # with one batch in and out on the device
    # the residual target keeps the reference stream's states, its next states and its two projections' outputs
    copies = 6 if residual else 2
    on_device = R if states_store(model, R, copies) is None else cfg.batch_size * seqlen
    states = copies * on_device * hidden * dtype_bytes if (gram or refit) else 0
    states += advance * hidden * dtype_bytes  # the probes' kept states
    comp = 0
    if cfg.compensate and n_sub:  # the candidates' columns of each H^-1 (host memory) and the probes' corrections
        share = min(1.0, cfg.candidate_multiple * cfg.p_iter)
        columns = [adapter.output_projection(k).in_features ** 2 * share * (8 if device.type == "cpu" else 4)
                   for k in groups]
        # on an accelerator only the probe in flight's columns and the bounded cache are there
        comp = sum(columns) if device.type == "cpu" else min(sum(columns), max(columns) + CORRECTION_CACHE_BYTES)
    return CostEstimate(iterations=iterations, sub_models_per_iteration=n_sub, forward_tokens=tokens, at_most=cfg.adaptive,
                        seconds_per_token=seconds_per_token, seconds=tokens * seconds_per_token,
                        probe_peak_bytes=probe_peak, extra_bytes=int(gram_bytes + states + comp))
