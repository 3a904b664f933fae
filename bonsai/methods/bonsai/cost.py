"""What a prune run will cost, before it starts: time from timed passes, peak memory phase by phase.

Time. A token costs its pass through the blocks and, where a loss is taken, through the head; the two are timed
apart on the actual device and dtype (a pass that stops before the head, `logits_to_keep=1`, and one scored by
the chunked head of `bonsai.engine.logits`), since a large vocabulary makes the head most of a forward (Gemma-3-270M:
168M of its 268M parameters). Per iteration, in tokens (C: calibration, R: refit):
  prior pass                 C through the blocks and the head
  unit errors                R through the blocks, plus sequential OBS (its matrix products, timed)
  sub-models                 n x C: a probe of layer i runs blocks i.. and the head (`engine.prefix`), on average
                             (L+1)/2L of the blocks, plus one pass of C to advance the kept states
  allocation search          (N + 1) x C through the whole model (C: --search-samples' windows when set, plus a pass
                             for their reference), and up to 5 x V (the verification windows)
  refit                      3 x R through the blocks (2 x R for a parallel block; 0 with --reconstruct none),
                             4 x R with --refit-target residual (one pass over the reference stream)
The blocks' share shrinks as the model does (by p_iter a step); the Gram solves and the regression are left out.

Memory. The model as loaded and touched, then the largest of what each phase adds: the scored batch (its
activations and one chunk of logits, measured), one layer's Gram matrix and its inverse, the block states
(or two batches of them where they wait outside, `spill.states_store`), the candidates' columns of each
H^-1 (host memory; on a CPU at most HOST_STATES_SHARE of the model before they go to a file) and the probes'
corrections.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from bonsai.engine.compensation import CORRECTION_CACHE_BYTES, CORRECTION_CACHE_SHARE
from bonsai.engine.obs import OBS_BLOCK
from bonsai.engine.reconstruction import refit_windows, widest_projection
from bonsai.engine.spill import HOST_STATES_SHARE, states_store
from bonsai.engine.statistics import gram_dtype
from bonsai.methods.bonsai.allocation_search import VERIFIED
from bonsai.methods.settings import PruneConfig
from bonsai.runtime import current_memory, peak_memory, release_memory, reset_peak_memory


@dataclass
class CostEstimate:
    iterations: int
    sub_models_per_iteration: int
    block_tokens: float  # tokens through the blocks, each counted by the share of block parameters left
    head_tokens: float  # tokens through the head (scored)
    seconds_per_block_token: float
    seconds_per_head_token: float
    obs_seconds: float  # sequential OBS, over the run
    base_bytes: int  # the model loaded and touched
    phase_bytes: dict[str, int] = field(default_factory=dict)  # what each phase adds at its peak
    at_most: bool = False  # adaptive sampling: the sub-models (and the time) are a maximum
    # the peak already reached before the first phase (tokenising the text, loading the model): measured, not
    # predicted; it is the run's peak on small models over long texts (a tokenizer's working memory)
    loaded_peak_bytes: int = 0

    @property
    def seconds(self) -> float:
        return (self.block_tokens * self.seconds_per_block_token + self.head_tokens * self.seconds_per_head_token
                + self.obs_seconds)

    @property
    def forward_tokens(self) -> float:
        """Tokens through the blocks (what the run's time mostly scales with)."""
        return self.block_tokens

    @property
    def peak_bytes(self) -> int:
        return max(self.base_bytes + max(self.phase_bytes.values(), default=0), self.loaded_peak_bytes)

    @property
    def peak_phase(self) -> str:
        if self.loaded_peak_bytes > self.base_bytes + max(self.phase_bytes.values(), default=0):
            return "tokenising and loading"
        return max(self.phase_bytes, key=self.phase_bytes.get) if self.phase_bytes else "-"

    def line(self) -> str:
        most = "at most " if self.at_most else ""
        return (f"estimate: {self.iterations} iterations x {most}{self.sub_models_per_iteration} sub-models, "
                f"{self.block_tokens / 1e6:.1f}M block tokens, ~{most}{_duration(self.seconds)} on this device, "
                f"peak memory ~{self.peak_bytes / 2**30:.1f} GiB ({self.peak_phase})")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def sub_models_per_iteration(cfg: PruneConfig, num_groups: int) -> int:
    if not cfg.evaluates:
        return 0
    return num_groups * cfg.probe_depths if cfg.selection == "probe" else cfg.samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _obs_seconds(adapter, groups, cfg: PruneConfig, device: torch.device, unit_p_iter: float) -> float:
    """Sequential OBS of every MLP group, per iteration: K = W^T W (2 n^2 out) and the deferred updates (about
    8 n^2 per step), at the rate of a matrix product of that shape timed here."""
    if not cfg.sequential_obs:
        return 0.0
    dtype = gram_dtype(device)
    m = 512
    a, b = torch.randn(m, OBS_BLOCK, dtype=dtype, device=device), torch.randn(OBS_BLOCK, m, dtype=dtype, device=device)
    a @ b  # warm-up
    rate = 2 * m * m * OBS_BLOCK * 4 / max(_timed(lambda: [a @ b for _ in range(4)], device), 1e-9)  # flop/s
    flops = 0.0
    for key in groups:
        if adapter.unit_width(key) != 1:
            continue  # key/value groups: a few units, a few small solves
        n, out = adapter.group_size(key), adapter.output_projection(key).out_features
        steps = min(n, int(cfg.pool_multiple * unit_p_iter * n + 1))
        flops += 2.0 * n * n * out + 8.0 * n * n * steps
    return flops / rate


@torch.no_grad()
def estimate(cfg: PruneConfig, model, adapter, groups, seqlen: int, iterations: int, parallel_block: bool,
             unit_p_iter: float | None = None) -> CostEstimate:
    """Time and measure one batch through the blocks and through the scored head, and extrapolate to the run."""
    from bonsai.engine.logits import ChunkedHead

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    B = cfg.batch_size
    batch = torch.randint(0, vocab, (B, seqlen), generator=torch.Generator().manual_seed(0)).to(device)
    model(batch[:1, : min(seqlen, 16)], use_cache=False, logits_to_keep=1)  # warm-up: every weight touched once
    release_memory()
    base = current_memory(device)
    t_blocks = _timed(lambda: model(batch, use_cache=False, logits_to_keep=1), device)
    head = ChunkedHead(model)
    reset_peak_memory(device)
    t_scored = _timed(lambda: head.nll(batch), device)
    scored = max(0, peak_memory(device) - base)  # one scored batch: activations and a chunk of logits
    per_block = t_blocks / batch.numel()
    per_head = max(0.0, t_scored - t_blocks) / batch.numel()

    C = cfg.calib_samples * seqlen
    widest = widest_projection(adapter, groups)
    R = refit_windows(cfg.reconstruct_samples, cfg.calib_samples, widest, seqlen) * seqlen
    n_sub = sub_models_per_iteration(cfg, len(groups))
    gram = cfg.selection == "probe" or cfg.prior == "obs" or (cfg.compensate and n_sub)
    residual = cfg.refit_target == "residual" and cfg.reconstruct == "lstsq" and adapter.residual_scale(0) is not None
    refit = 0 if cfg.reconstruct == "none" else (2 if parallel_block else 3) + (1 if residual else 0)
    probe_blocks, advance = 1.0, 0
    if cfg.selection == "probe" and n_sub:  # each probe starts at its own block
        layers = adapter.num_layers
        probe_blocks, advance = (layers + 1) / (2 * layers), C
    # the allocation search: whole-network sub-models on C, then at most VERIFIED + 1 of them and the current model
    # (its reference) on the verification windows
    S = (cfg.search_samples or cfg.calib_samples) * seqlen  # with --search-samples, plus its own reference pass
    search = (cfg.search + 1 + (1 if cfg.search_samples else 0)) * S \
        + (VERIFIED + 2) * seqlen * (cfg.search_verify_samples or 4 * cfg.calib_samples) if cfg.search else 0
    block_tokens = head_tokens = 0.0
    for t in range(iterations):
        left = 1.0 - cfg.sparsity * t / iterations  # the share of block parameters still there
        block_tokens += left * (C + (R if gram else 0) + n_sub * C * probe_blocks + advance + refit * R + search)
        head_tokens += C + n_sub * C + search
    obs = iterations * _obs_seconds(adapter, groups, cfg, device, unit_p_iter or cfg.p_iter) if gram else 0.0

    # memory each phase adds to the loaded model
    dtype_bytes = next(model.parameters()).element_size()
    gram_element = torch.finfo(gram_dtype(device, widest)).bits // 8
    gram_bytes = widest * widest * gram_element
    hidden = model.config.hidden_size
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def states(copies: int) -> int:  # block states over the refit windows, or two batches where they wait outside
        on_device = R if states_store(model, R, copies) is None else 2 * B * seqlen
        return copies * on_device * hidden * dtype_bytes

    columns = 0
    cache = 0
    if cfg.compensate and n_sub:  # the candidates' columns of each H^-1 and the probes' corrections
        share = min(1.0, cfg.pool_multiple * (unit_p_iter or cfg.p_iter))
        sizes = [adapter.output_projection(k).in_features ** 2 * share
                 * torch.finfo(gram_dtype(device, adapter.output_projection(k).in_features)).bits // 8 for k in groups]
        # host memory on an accelerator (one group's columns on the device at a time); a file past the budget on a CPU
        columns = int(min(sum(sizes), HOST_STATES_SHARE * model_bytes)) if device.type == "cpu" else int(max(sizes))
        biggest = max(adapter.output_projection(k).in_features for k in groups) ** 2 * share * 4
        cache = int(max(biggest, min(CORRECTION_CACHE_BYTES, CORRECTION_CACHE_SHARE * model_bytes)))
    reference = C * 64 * 12  # top-64 log-probabilities and ids per calibration token
    phases = {"prior_pass": scored + reference}
    if gram:
        # n x n matrices at once: the Gram matrix and its damped inverse while it is factored, then H^-1 and the
        # path's W^T W; a third (the path's own copy of H^-1) unless the path may use H^-1 itself (compensation kept,
        # its columns set aside first: `group_statistics`)
        in_place = cfg.compensate and n_sub and cfg.sequential_obs and cfg.reconstruct == "lstsq"
        phases["unit_errors"] = scored // 2 + (2 if in_place else 3) * gram_bytes + states(2) + columns
    if n_sub:
        phases["sub_models"] = scored + columns + cache + reference + advance * hidden * dtype_bytes
    if refit:
        phases["reconstruction"] = scored // 2 + 3 * gram_bytes + states(6 if residual else 2)
    n_all = n_sub + (cfg.search + 1 if cfg.search else 0)
    return CostEstimate(iterations=iterations, sub_models_per_iteration=n_all, block_tokens=block_tokens,
                        head_tokens=head_tokens, seconds_per_block_token=per_block, seconds_per_head_token=per_head,
                        obs_seconds=obs, base_bytes=base, phase_bytes={k: int(v) for k, v in phases.items()},
                        at_most=cfg.adaptive)
