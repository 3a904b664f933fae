"""`bonsai prune`: Algorithm 1 of the paper, iterated to the target sparsity, checkpointed and resumable.

Per iteration: prior on the current model -> fixed units and candidates per group -> sub-models and
their complements -> U by forward passes -> regression -> global removal by real parameter count ->
physical slicing. The ablations share the loop and differ only in how candidates are scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bonsai.adapters import KINDS, GroupKey, get_adapter
from bonsai.adapters.base import ArchAdapter
from bonsai.distributed import Dist
from bonsai.engine.reconstruction import RemovalReport, remove_units
from bonsai.engine.selection import (
    check_reachable,
    select_removals,
)
from bonsai.engine import faults
from bonsai.engine.run_folder import RunFolder, open_run_folder
from bonsai.progress import console, make_progress
from bonsai.methods.settings import LEGACY_SETTINGS, PruneConfig
from bonsai.methods.bonsai.allocation_search import AllocationSearch
from bonsai.methods.bonsai.scoring import unit_scores
from bonsai.methods.bonsai.report import RunReport, finite_or_none, removal_summary
from bonsai.methods.bonsai.search import SubModelSearch
from bonsai.methods.bonsai.steps import StepSelection
from bonsai.methods.bonsai.state import RunState, StateStore
from bonsai.runtime import PhasePeaks

@dataclass
class Budget:
    block_params: int
    total_params: int
    prunable_params: int
    target_removed: float
    step: float
    iterations: int
    unit_p_iter: float  # the share of each group's units one iteration may need (the candidate pool is twice it)
    initial_units: dict[str, int] = field(default_factory=dict)  # the parent's units per group


def plan_budget(adapter: ArchAdapter, groups: list[GroupKey], cfg: PruneConfig) -> Budget:
    block = adapter.block_parameters()
    total = sum(p.numel() for p in adapter.model.parameters())
    prunable = sum(adapter.group_size(k) * adapter.params_per_unit(k) for k in groups)
    target = cfg.sparsity * block
    check_reachable(cfg.sparsity, prunable, block, f"--units {cfg.units}")
    # Algorithm 1 runs ceil(p / p_iter) iterations; equal steps make the last one end at the target.
    iterations = max(1, math.ceil(cfg.sparsity / cfg.p_iter - 1e-9))
    # p_iter is a share of the block's parameters; when only some kinds of units may go (--units mlp, or a family
    # whose heads cannot be sliced), each iteration must take a larger share of those units to reach it
    unit_p_iter = cfg.p_iter if set(KINDS) <= {k.kind for k in groups} else min(0.5, cfg.p_iter * block / prunable)
    return Budget(block, total, prunable, target, target / iterations, iterations, unit_p_iter,
                  {str(k): adapter.group_size(k) for k in groups})




class PruneRun(SubModelSearch, AllocationSearch, StepSelection, RunReport):
    """One prune run: its folder and state, the iteration loop, removal and refit (the search, the allocation
    search, the steps and the report are its parts in search.py, allocation_search.py, steps.py and report.py)."""

    def __init__(self, cfg: PruneConfig, out_dir: str | Path, force: bool = False, model=None, tokenizer=None,
                 dry_run: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.store = StateStore(self.out)
        self.dist = Dist()
        self.folder = RunFolder(self.out) if dry_run else self._open_folder(force)
        self.resuming = self.folder.resuming
        from bonsai.eval.runner import default_seqlen
        from bonsai.models.checks import check_finite
        from bonsai.models.loading import load_model, load_tokenizer

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        from bonsai.data.windows import prepare_text

        if not dry_run:  # a dry run estimates from the settings alone; it needs no text
            prepare_text(self.tokenizer, cfg.calib)  # before the model: the tokenizer's peak stays below the model's
        self.model = model if model is not None else load_model(cfg.model, dtype=cfg.dtype,
                                                                 device=self.dist.device(cfg.device),
                                                                 device_map=cfg.device_map)
        if model is None:
            check_finite(self.model, cfg.model)
        self.adapter = get_adapter(self.model)
        self.device = next(self.model.parameters()).device
        self.peaks = PhasePeaks(self.device)  # after loading: the model's own memory is in every phase
        self.seqlen = default_seqlen(self.model.config, cfg.seqlen)
        from bonsai.data import resolve_bos

        self.bos = resolve_bos(self.tokenizer, cfg.bos)
        self.adapter.check_kinds(cfg.unit_kinds)
        self.groups = self.adapter.groups(cfg.unit_kinds)
        self._refit_windows = 0  # set with the run's state (`_initial_state`)
        self.budget = plan_budget(self.adapter, self.groups, cfg)
        self.evals_this_process = 0
        self._adaptive_fit = self._last_fit = None  # adaptive sampling: the last round's regression
        # per iteration, in memory only (recomputed on resume): the candidates' H^-1 columns for compensated
        # sub-models, and the current model's next-token distributions for the KL utility
        self._compensation = None
        self._reference = None
        self._progress = None
        self.on_iteration = None  # called with each finished iteration's report entry (`--log-json`)

    # ---- output folder and state ---------------------------------------------------------
    def _open_folder(self, force: bool) -> RunFolder:
        """The output folder's rule (`bonsai.engine.run_folder`); settings added since a run was checkpointed
        count as their defaults then (LEGACY_SETTINGS, else today's)."""
        return open_run_folder(self.out, force, self.cfg.fingerprint(),
                               lambda: self.store.load().fingerprint if self.store.exists() else None,
                               legacy={**PruneConfig().to_dict(), **LEGACY_SETTINGS})

    def _initial_state(self) -> RunState:
        if self.resuming:
            state = self.store.load()
            # checkpointed before the count was stored: those versions refit on --calib-samples windows by default
            self._refit_windows = state.refit_windows or self.cfg.reconstruct_samples or self.cfg.calib_samples
            self._restore(state)
            return state
        from bonsai.engine.reconstruction import refit_windows, widest_projection

        # from the parent's widest projection, so that the count stays the same through the run
        self._refit_windows = refit_windows(self.cfg.reconstruct_samples, self.cfg.calib_samples,
                                            widest_projection(self.adapter, self.groups), self.seqlen)
        state = RunState(fingerprint=self.cfg.fingerprint(),
                         kept={str(k): list(range(self.adapter.group_size(k))) for k in self.groups},
                         started=time.time(), refit_windows=self._refit_windows)
        self._save(state)
        return state

    def _save(self, state: RunState) -> None:
        if self.dist.is_main:
            self.store.save(state)

    def _restore(self, state: RunState) -> None:
        """Rebuild the pruned model of a previous process: one exact slicing of the original, then the
        refit output projections of the last finished iteration."""
        for key in self.groups:
            kept = state.kept[str(key)]
            if len(kept) != self.adapter.group_size(key):
                self.adapter.slice(key, torch.tensor(kept, dtype=torch.long))
        if not state.refit or (state.finished and self._saved()):  # a saved run's weights are in its model
            return
        self._install_refit(self.store.load_weights(state.refit))

    def _saved(self) -> bool:
        """Whether the finished model was written (the save renames a complete folder into place)."""
        return (self.out / "config.json").exists() and any(self.out.glob("*.safetensors"))

    def _install_refit(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy refit output projections (from `_refit_tensors`) into the sliced model."""
        with torch.no_grad():
            for key in self.groups:
                lin = self.adapter.output_projection(key)
                lin.weight.copy_(tensors[f"{key}.weight"])
                if f"{key}.bias" in tensors:
                    if lin.bias is None:
                        self.adapter.add_output_bias(key)
                    lin.bias.copy_(tensors[f"{key}.bias"])

    def estimate(self):
        """The run's cost (iterations, sub-models, forward tokens, time, peak memory) from a timing probe."""
        from bonsai.methods.bonsai.cost import estimate

        cost = estimate(self.cfg, self.model, self.adapter, self.groups, self.seqlen, self.budget.iterations,
                        self.adapter.parallel_block, unit_p_iter=self.budget.unit_p_iter)
        cost.loaded_peak_bytes = self.peaks.overall
        return cost

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        if not self.resuming:
            self._windows(0)  # text too short for a window, or unreachable: refused before anything is written
        self.folder.clear_replaced(self.dist.barrier, self.dist.is_main)
        state = self._initial_state()
        if state.finished and self._saved():
            console.print(f"{self.out} already holds the finished run; nothing to do")
            return self._report(state)
        if state.finished:  # killed while saving: the state and the refit weights are all it takes
            console.print(f"{self.out}: the run finished but its save was interrupted; saving again")
            report = self._finish(state) if self.dist.is_main else self._report(state)
            if self.dist.is_main:
                self.store.prune_weights(keep=None)
            self.dist.barrier()
            return report
        if self.dist.is_main and not self.resuming:
            cost = self.estimate()
            console.print(cost.line())
            self._estimate = {"seconds": cost.seconds, "peak_memory_bytes": cost.peak_bytes, "base_bytes": cost.base_bytes,
                              "phase_bytes": cost.phase_bytes, "loaded_peak_bytes": cost.loaded_peak_bytes}
        t0 = time.time()
        b = self.budget
        if self.resuming and self.dist.is_main:
            console.print(f"resuming {self.out} at iteration {state.completed_iterations + 1}/{b.iterations}")
        with make_progress(disable=not self.dist.is_main) as progress:
            self._progress = progress
            it_task = progress.add_task("iterations", total=b.iterations, completed=state.completed_iterations,
                                        info=f"sparsity 0.000 → {self.cfg.sparsity}")
            for t in range(state.completed_iterations, b.iterations):
                if b.block_params - self.adapter.block_parameters() >= b.target_removed:
                    break  # an earlier iteration's last unit overshot into this one's share
                self._iteration(t, state, progress)
                state.completed_iterations = t + 1
                state.elapsed_before += time.time() - t0
                t0 = time.time()
                self._save(state)
                if self.dist.is_main:
                    self.store.clear_iteration()
                    self.store.prune_weights(keep=state.refit)
                    if self.on_iteration is not None:
                        self.on_iteration(state.history[-1])
                progress.update(it_task, completed=t + 1, info=f"sparsity {state.history[-1]['sparsity']:.3f}")
            progress.update(it_task, completed=b.iterations)
        # each iteration reaches its share within one unit unless its candidates cannot give it (e.g. --width-multiple
        # steps larger than what is left): say so, never silently
        if not self._target_reached() and self.dist.is_main:
            short = b.target_removed - (b.block_params - self.adapter.block_parameters())
            console.print(f"[yellow]{short:,.0f} block parameters short of --sparsity {self.cfg.sparsity}: the last "
                          "iteration's candidates could not give more")
        state.finished = True
        self._save(state)
        report = self._finish(state) if self.dist.is_main else self._report(state)
        if self.dist.is_main:
            self.store.prune_weights(keep=None)  # the saved model holds them now
        self.dist.barrier()
        return report

    def _iteration(self, t: int, state: RunState, progress) -> None:
        cfg, b, adapter = self.cfg, self.budget, self.adapter
        start = time.time()
        removed = b.block_params - adapter.block_parameters()
        need = min((t + 1) * b.step, b.target_removed) - removed
        windows = self._windows(t)
        self._compensation = self._reference = self._split_record = None
        self._phase_peaks = {}
        self.peaks.start()
        self._held = self.peaks.held  # what earlier iterations left behind shows here
        it = self.store.load_iteration(t)
        if it is None:
            it = self._start_iteration(t, windows)
        it = self.dist.broadcast(it)  # every replica works from the main process's masks
        phases = {"statistics": time.time() - start}  # prior pass, unit errors (0 where a checkpoint held them)
        self._phase_end("statistics", parts=("prior_pass", "unit_errors"))
        mark = time.time()
        keys = [k for k in self.groups if len(it.candidates[str(k)])]
        offsets = np.cumsum([0] + [len(it.candidates[str(k)]) for k in keys])
        cand_prior = np.concatenate([it.prior[str(k)][it.candidates[str(k)]] for k in keys]) if keys else np.zeros(0)
        cand_params = np.concatenate([np.full(len(it.candidates[str(k)]), adapter.params_per_unit(k)) for k in keys]
                                     ) if keys else np.zeros(0)
        adaptive = None
        if cfg.evaluates:
            if cfg.adaptive:
                adaptive = self._evaluate_adaptive(it, keys, offsets, windows, progress, cand_prior, cand_params,
                                                   need, t)
            else:
                # the split probes (uniform allocation) and the allocation search evaluate with the same
                # compensation: kept until then
                self._evaluate_pending(it, keys, offsets, windows, progress,
                                       release=not (self._probes_splits() or cfg.search))
        phases["sub_models"], mark = time.time() - mark, time.time()
        self._phase_end("sub_models")
        fitted = self._adaptive_fit if adaptive else None  # the last round's fit: no second regression
        scores, reg, probe = unit_scores(cfg, it, keys, offsets, cand_prior, cand_params, t, fitted)
        search = None
        if cfg.search:
            removed, search = self._search_allocation(it, keys, offsets, scores, cand_prior, need, windows, progress)
            self._compensation = None
        elif cfg.width_multiple > 1 or cfg.head_multiple > 1 or cfg.allocation == "uniform":
            removed = self._select_in_steps(it, keys, offsets, scores, need, windows, progress)
            self._compensation = None
        else:
            drop = select_removals(scores, cand_prior, cand_params, need)
            removed = {key: it.candidates[str(key)][drop[(drop >= offsets[j]) & (drop < offsets[j + 1])] - offsets[j]]
                       for j, key in enumerate(keys)}
        removed = self.dist.broadcast({k: np.sort(v) for k, v in removed.items() if len(v)})
        phases["selection"], mark = time.time() - mark, time.time()
        self._phase_end("selection")
        removal = self._apply(t, removed, state, progress)
        phases["reconstruction"] = time.time() - mark  # slicing, the refit and its checkpoint
        self._phase_end("reconstruction")
        n_bad = int((~np.isfinite(it.utility) & it.done).sum())
        if n_bad:
            console.print(f"[yellow]iteration {t + 1}: {n_bad} sub-model(s) had a non-finite loss and were left out of the fit")
        block_now = adapter.block_parameters()
        state.history.append({
            "iteration": t + 1,
            "attention_units": [adapter.group_size(GroupKey(i, "attention")) for i in range(adapter.num_layers)],
            "mlp_units": [adapter.group_size(GroupKey(i, "mlp")) for i in range(adapter.num_layers)],
            "block_params": block_now,
            "sparsity": 1 - block_now / b.block_params,
            "removed_units": int(sum(len(v) for v in removed.values())),
            # groups that gave every candidate: the candidate floor (the step), not the measurement, set their size
            "at_floor": [str(k) for k in keys if len(removed.get(k, ())) >= min(self._floor(k),
                                                                                len(it.candidates[str(k)]))],
            "candidates": len(cand_prior),
            "sub_models": int(it.done.sum()),
            "non_finite": n_bad,
            "cv_tau": None if reg is None else finite_or_none(reg.cv_tau),
            "penalty": None if reg is None else finite_or_none(reg.alpha),
            "probe_increase": probe,
            "adaptive": adaptive,
            "uniform_splits": self._split_record,
            "allocation_search": search,
            "reconstruction": removal_summary(removal),
            "calib_loss": it.base_loss,
            "calib_ppl": math.exp(it.base_loss) if it.base_loss < 700 else float("inf"),
            "seconds": time.time() - start,
            "phase_seconds": phases,  # this process's share (a resumed iteration's earlier work is not in it)
            "phase_peak_bytes": self._phase_peaks,  # peak memory of each phase (RSS on CPU, allocated on a GPU)
            "held_bytes": self._held,  # memory held as the iteration started
        })

    def _phase_end(self, name: str, parts: tuple[str, ...] = ()) -> None:
        """Record the peak memory of the phase that just ended (the largest of its `parts` recorded before) and
        start the next one's."""
        self._phase_peaks[name] = max([self.peaks.end(name)] + [self._phase_peaks.get(p, 0) for p in parts])
        self.peaks.start()

    def _windows(self, t: int) -> torch.Tensor:
        from bonsai.data import calibration_windows

        return calibration_windows(self.tokenizer, self.cfg.calib, self.cfg.calib_samples, self.seqlen,
                                   seed=self.cfg.seed * 100003 + t, bos=self.bos)

    def _apply(self, t: int, removed: dict[GroupKey, np.ndarray], state: RunState, progress) -> RemovalReport:
        """Remove the chosen units (slice, and refit the output projections unless --reconstruct none)."""
        keep = {}
        for key, units in removed.items():
            removed_units = set(np.asarray(units).tolist())
            keep[key] = [u for u in range(self.adapter.group_size(key)) if u not in removed_units]
        cfg = self.cfg
        refit = cfg.reconstruct != "none" and bool(keep)
        if refit and self.dist.enabled:
            # the refit runs once, on the main process (replicas with other thread counts would round
            # differently); the others slice and receive its weights
            report, tensors = None, None
            if self.dist.is_main:
                report = remove_units(self.model, self.adapter, keep, self._recon_windows(t), cfg.reconstruct,
                                      cfg.reconstruct_damp, cfg.batch_size, progress,
                                      on_warning=lambda m: console.print(f"[yellow]{m}"),
                                      target=cfg.refit_target, kinds=cfg.unit_kinds)
                tensors = self._refit_tensors()
            report, tensors = self.dist.broadcast((report, tensors))
            if not self.dist.is_main:
                remove_units(self.model, self.adapter, keep, None, "none")
                self._install_refit(tensors)
        else:
            report = remove_units(self.model, self.adapter, keep, self._recon_windows(t) if refit else None,
                                  cfg.reconstruct, cfg.reconstruct_damp, cfg.batch_size, progress,
                                  on_warning=lambda m: console.print(f"[yellow]{m}"), on_block=faults.reconstruction_crash(t),
                                  target=cfg.refit_target, kinds=cfg.unit_kinds)
        for key, kept in keep.items():
            original = state.kept[str(key)]
            state.kept[str(key)] = [original[u] for u in kept]
        if cfg.reconstruct != "none":
            state.refit = f"weights-{t + 1}.safetensors"
            if self.dist.is_main:
                self.store.save_weights(self._refit_tensors(), state.refit)
        return report

    def _recon_windows(self, t: int) -> torch.Tensor:
        """The refit's windows (also the compensation statistics'): an independent draw from the calibration text,
        not the sub-models' windows."""
        from bonsai.data import calibration_windows

        n = self._refit_windows
        return calibration_windows(self.tokenizer, self.cfg.calib, n, self.seqlen, seed=self.cfg.seed * 100003 + t + 50021,
                                   bos=self.bos)

    def _refit_tensors(self) -> dict[str, torch.Tensor]:
        """Every group's output projection (weight, bias): what reconstruction changes beyond slicing."""
        out = {}
        for key in self.groups:
            lin = self.adapter.output_projection(key)
            out[f"{key}.weight"] = lin.weight.detach().cpu().contiguous()
            if lin.bias is not None:
                out[f"{key}.bias"] = lin.bias.detach().cpu().contiguous()
        return out









