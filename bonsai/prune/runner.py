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
from bonsai.engine.compensation import group_statistics
from bonsai.engine.reconstruction import RemovalReport, remove_units
from bonsai.engine.selection import (
    GroupOrder,
    changed_share,
    check_reachable,
    select_in_multiples,
    select_removals,
    uniform_options,
)
from bonsai.engine import faults
from bonsai.engine.run_folder import RunFolder, open_run_folder
from bonsai.errors import BonsaiError
from bonsai.io import write_json_atomic
from bonsai.progress import console, make_progress
from bonsai.prune.config import LEGACY_SETTINGS, PruneConfig
from bonsai.prune.evaluate import SubModelEvaluator, prior_pass
from bonsai.prune.priors import NEEDS_GRAM
from bonsai.prune.regression import fit_unit_scores
from bonsai.prune.sampling import candidate_units, probe_masks, sample_masks
from bonsai.prune.scoring import unit_scores
from bonsai.prune.state import IterationState, RunState, StateStore
from bonsai.runtime import PhasePeaks

TAU_RISE = 0.01  # adaptive sampling: a CV tau higher than the last round's by more than this is still rising


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


def emptied_groups(history: list[dict], initial: dict[str, int]) -> list[dict]:
    """Groups this run took to zero units, with the evidence: the group's measured probe cost in that iteration
    beside the median over all groups (a layer should lose everything only when removing it costs little)."""
    out, before = [], dict(initial)
    for rec in history:
        sizes = {f"{i}.attention": n for i, n in enumerate(rec["attention_units"])}
        sizes |= {f"{i}.mlp": n for i, n in enumerate(rec["mlp_units"])}
        probes = rec.get("probe_increase") or {}
        for group, n in sizes.items():
            if n == 0 and before.get(group, 0) > 0:
                entry = {"group": group, "iteration": rec["iteration"], "units_before": before[group]}
                if group in probes:
                    entry["probe_increase"] = probes[group]
                    entry["median_probe_increase"] = float(np.median(list(probes.values())))
                out.append(entry)
        before = sizes
    return out


def _rng(seed: int, iteration: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, iteration, stream])


class PruneRun:
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
        from bonsai.prune.cost import estimate

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
        if cfg.method in ("bonsai", "no-regression"):
            if cfg.adaptive:
                adaptive = self._evaluate_adaptive(it, keys, offsets, windows, progress, cand_prior, cand_params,
                                                   need, t)
            else:
                # the split probes (uniform allocation) evaluate with the same compensation: kept until then
                self._evaluate_pending(it, keys, offsets, windows, progress, release=not self._probes_splits())
        phases["sub_models"], mark = time.time() - mark, time.time()
        self._phase_end("sub_models")
        fitted = self._adaptive_fit if adaptive else None  # the last round's fit: no second regression
        scores, reg, probe = unit_scores(cfg, it, keys, offsets, cand_prior, cand_params, t, fitted)
        if cfg.width_multiple > 1 or cfg.head_multiple > 1 or cfg.allocation == "uniform":
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
            "at_floor": [str(k) for k in keys if len(removed.get(k, ())) >= len(it.candidates[str(k)])],
            "candidates": len(cand_prior),
            "sub_models": int(it.done.sum()),
            "non_finite": n_bad,
            "cv_tau": None if reg is None else _finite_or_none(reg.cv_tau),
            "penalty": None if reg is None else _finite_or_none(reg.alpha),
            "probe_increase": probe,
            "adaptive": adaptive,
            "uniform_splits": self._split_record,
            "reconstruction": _summary(removal),
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

    def _needs_gram(self) -> bool:
        """Whether this run needs each group's Gram matrix at the start of an iteration."""
        cfg = self.cfg
        return cfg.prior in NEEDS_GRAM or cfg.selection == "probe" or (cfg.compensate and self._evaluates())

    def _evaluates(self) -> bool:
        return self.cfg.method in ("bonsai", "no-regression")

    def _gram_pass(self, windows: torch.Tensor, priors: dict) -> tuple[dict, dict]:
        """Compensated unit errors of every group and, when sub-models are compensated, the candidates'
        columns of each H^-1 (kept in memory only, recomputed on resume). It reads the refit's windows: more
        tokens than the sub-models' windows (a Gram matrix is as wide as the layer), and independent of them,
        so a compensated sub-model is scored out of sample, as the final refit will be."""
        cfg = self.cfg

        def candidate_columns(key: GroupKey, errors: torch.Tensor) -> torch.Tensor:
            score = errors.numpy() if cfg.prior in NEEDS_GRAM else priors[key]
            cand = torch.from_numpy(candidate_units(score, self.budget.unit_p_iter, cfg.candidate_multiple))
            width = self.adapter.unit_width(key)
            return (cand[:, None] * width + torch.arange(width)[None, :]).reshape(-1)

        def pool(key: GroupKey) -> int:  # the candidates' count, ordered by sequential OBS when asked
            if not cfg.sequential_obs:
                return 0
            n = self.adapter.group_size(key)
            return len(candidate_units(np.zeros(n), self.budget.unit_p_iter, cfg.candidate_multiple))

        stats, compensation = group_statistics(self.model, self.adapter, self.groups, windows, cfg.batch_size,
                                               damp=cfg.reconstruct_damp, keep_inverse=cfg.compensate,
                                               refit=cfg.reconstruct, sequential=pool, columns=candidate_columns,
                                               progress=self._progress)
        return {k: stats[k].unit_error.numpy() for k in self.groups}, compensation

    def _start_iteration(self, t: int, windows: torch.Tensor) -> IterationState:
        cfg = self.cfg
        if cfg.utility == "kl" and self._evaluates():
            priors, base_loss, self._reference = prior_pass(self.model, self.adapter, self.groups, windows, cfg.prior,
                                                            cfg.batch_size, reference=True)
        else:
            priors, base_loss = prior_pass(self.model, self.adapter, self.groups, windows, cfg.prior, cfg.batch_size)
        self._phase_end("prior_pass")
        errors = {}
        if self._needs_gram():
            errors, self._compensation = self._gram_pass(self._recon_windows(t), priors)
            self._phase_end("unit_errors")
            if cfg.prior in NEEDS_GRAM:
                priors = dict(errors)
        candidates = {str(k): candidate_units(priors[k], self.budget.unit_p_iter, cfg.candidate_multiple)
                      for k in self.groups}
        cand_priors = [priors[k][candidates[str(k)]] for k in self.groups if len(candidates[str(k)])]
        total = sum(len(c) for c in cand_priors)
        n = cfg.samples if self._evaluates() else 0
        if n and cfg.selection == "probe":
            masks = probe_masks(cand_priors, levels=cfg.probe_depths)
            n = len(masks)
        else:
            masks = sample_masks(cand_priors, n, _rng(cfg.seed, t, 1)) if n else np.zeros((0, total), np.uint8)
        it = IterationState(iteration=t, prior={str(k): v for k, v in priors.items()}, candidates=candidates,
                            masks=masks, utility=np.full(n, np.nan), done=np.zeros(n, bool), base_loss=base_loss,
                            nr_sum=np.zeros(total), nr_count=np.zeros(total),
                            unit_error={str(k): v for k, v in errors.items()})
        if self.dist.is_main:
            self.store.save_iteration(it)
        return it

    def _full_masks(self, it: IterationState, keys, offsets) -> dict[GroupKey, torch.Tensor]:
        out = {}
        for j, key in enumerate(keys):
            m = torch.ones(len(it.masks), self.adapter.group_size(key), dtype=torch.uint8)
            m[:, torch.from_numpy(it.candidates[str(key)])] = torch.from_numpy(it.masks[:, offsets[j]:offsets[j + 1]])
            out[key] = m
        return out

    def _evaluate_adaptive(self, it: IterationState, keys, offsets, windows, progress, cand_prior: np.ndarray,
                           cand_params: np.ndarray, need: float, t: int) -> dict:
        """Sub-models in rounds of `cfg.round_size`; after each round the regression is refit and the iteration
        stops once the units it would remove have settled (the parameters whose fate changed since the last
        round are at most `adaptive_tol` of those involved) and the cross-validated tau has stopped rising.
        Each finished round is checkpointed with its decision, so a resumed run takes the same path."""
        cfg = self.cfg
        n = len(it.masks)
        bounds = list(range(cfg.round_size, n, cfg.round_size)) + [n]
        rounds = [tuple(float(x) for x in row) for row in it.rounds]
        previous, reason = None, "maximum"
        self._adaptive_fit = None
        for r, end in enumerate(bounds):
            if r < len(rounds):  # finished before a resume
                if rounds[r][3]:  # stopped before the resume: the decision's fit is redone once, below
                    reason = "converged"
                    break
                if r == len(rounds) - 1:
                    previous, _ = self._adaptive_decision(it, cand_prior, cand_params, need, t, end)
                continue
            self._evaluate_pending(it, keys, offsets, windows, progress, upto=end, release=end == n)
            removal, tau = self._adaptive_decision(it, cand_prior, cand_params, need, t, end)
            self._adaptive_fit = self._last_fit
            change = 1.0 if previous is None or removal is None else changed_share(previous, removal, cand_params)
            last_tau = rounds[-1][1] if rounds else float("nan")
            rising = np.isfinite(tau) and (not np.isfinite(last_tau) or tau > last_tau + TAU_RISE)
            stop = bool(self.dist.broadcast(previous is not None and change <= cfg.adaptive_tol and not rising))
            rounds.append((float(end), float(tau), float(change), float(stop)))
            it.rounds = np.asarray(rounds, dtype=np.float64)
            if self.dist.is_main:
                self.store.save_iteration(it)
            previous = removal
            if stop:
                reason = "converged"
                break
        self._compensation = None
        used = int(it.done.sum())
        if self.dist.is_main:
            console.print(f"iteration {t + 1}: {used}/{n} sub-models ({reason})")
        return {"sub_models": used, "max_sub_models": n, "stop": reason, "round_size": cfg.round_size,
                "curve": [{"sub_models": int(e), "cv_tau": _finite_or_none(tau), "changed": ch}
                          for e, tau, ch, _ in rounds]}

    def _adaptive_decision(self, it: IterationState, cand_prior: np.ndarray, cand_params: np.ndarray, need: float,
                           t: int, end: int) -> tuple[np.ndarray | None, float]:
        """The candidates the regression on the first `end` sub-models would remove, and its CV tau."""
        cfg = self.cfg
        use = it.done & np.isfinite(it.utility) & (np.arange(len(it.masks)) < end)
        self._last_fit = None
        if use.sum() < 4:
            return None, float("nan")
        reg = fit_unit_scores(it.masks[use].astype(np.float64), it.utility[use], cfg.regression,
                              folds=cfg.cv_folds, seed=cfg.seed + t)
        self._last_fit = reg if use.sum() == (it.done & np.isfinite(it.utility)).sum() else None
        scores = reg.beta / cand_params if cfg.per_parameter else reg.beta
        return select_removals(scores, cand_prior, cand_params, need), reg.cv_tau

    def _evaluate_pending(self, it: IterationState, keys, offsets, windows, progress, upto: int | None = None,
                          release: bool = True) -> None:
        """Evaluate the sub-models not done yet (those before `upto`); `release` frees the compensation
        matrices afterwards (an adaptive round keeps them for the next)."""
        cfg = self.cfg
        pending = [i for i in range(len(it.masks) if upto is None else upto) if not it.done[i]]
        if not pending:
            return
        evaluator = self._evaluator(it, keys, windows, self._full_masks(it, keys, offsets),
                                    prior=cfg.prior if cfg.method == "no-regression" else None)
        task = progress.add_task(f"sub-models (iter {it.iteration + 1})", total=len(it.masks) * len(windows),
                                 completed=int(it.done.sum()) * len(windows), info="")
        chunks = [pending[i:i + cfg.checkpoint_every] for i in range(0, len(pending), cfg.checkpoint_every)]
        world, rank = self.dist.world, self.dist.rank
        for round_start in range(0, len(chunks), world):
            # whole chunks per process: batches are composed exactly as in a single-process run
            mine = chunks[round_start + rank] if round_start + rank < len(chunks) else []
            result = evaluator.evaluate(mine, on_row=lambda: progress.advance(task)) if mine else (np.zeros(0), None)
            for chunk, (utility, sample_prior) in zip(chunks[round_start:round_start + world],  # noqa: B905 (last round: fewer chunks than processes)
                                                      self.dist.all_gather(result)):
                self._record(it, keys, chunk, utility, sample_prior)
            if self.dist.is_main:
                self.store.save_iteration(it)
            self.evals_this_process += sum(len(c) for c in chunks[round_start:round_start + world])
            faults.crash_after(faults.AFTER_EVALS, self.evals_this_process)
        progress.remove_task(task)
        if release:
            self._compensation = None

    def _evaluator(self, it: IterationState, keys, windows: torch.Tensor, full_masks: dict[GroupKey, torch.Tensor],
                   prior: str | None = None) -> SubModelEvaluator:
        """An evaluator of sub-models given as full per-group masks, compensated as the probes are; what a resumed
        run lost (the Gram pass, the reference distributions) is recomputed the same way."""
        cfg = self.cfg
        compensation = None
        if cfg.compensate:
            if self._compensation is None:  # resumed mid-iteration: the same pass again
                _, self._compensation = self._gram_pass(self._recon_windows(it.iteration),
                                                        {GroupKey.parse(k): v for k, v in it.prior.items()})
            # every replica compensates with the main process's matrices (other thread counts round differently)
            compensation = self._compensation = self.dist.broadcast(self._compensation)
        if cfg.utility == "kl" and self._reference is None:  # resumed mid-iteration: the same forward again
            *_, self._reference = prior_pass(self.model, self.adapter, [], windows, "uniform", cfg.batch_size,
                                             reference=True)
        return SubModelEvaluator(self.model, self.adapter, keys, windows, full_masks, cfg.batch_size, prior=prior,
                                 compensation=compensation,
                                 candidates={k: torch.from_numpy(it.candidates[str(k)]) for k in keys},
                                 reference=self._reference if cfg.utility == "kl" else None)

    def _probes_splits(self) -> bool:
        """Whether uniform allocation's attention/MLP split is measured (bonsai's sub-models) or scored only."""
        cfg = self.cfg
        return cfg.allocation == "uniform" and cfg.method == "bonsai" and cfg.split_probes > 1

    @staticmethod
    def _record(it: IterationState, keys, chunk: list[int], utility: np.ndarray, sample_prior) -> None:
        it.utility[chunk] = utility
        it.done[chunk] = True
        if sample_prior is not None:
            bits = it.masks[chunk].astype(np.float64)
            per_unit = np.concatenate([sample_prior[k][:, it.candidates[str(k)]] for k in keys], axis=1)
            it.nr_sum += (per_unit * bits).sum(0)
            it.nr_count += bits.sum(0)

    def _select_in_steps(self, it: IterationState, keys, offsets, scores: np.ndarray, need: float,
                         windows: torch.Tensor, progress) -> dict[GroupKey, np.ndarray]:
        """Removal in whole steps: every group keeps a multiple of --width-multiple (MLP) / --head-multiple
        (attention) units, and with --allocation uniform every group of a kind loses the same number."""
        cfg = self.cfg
        cand_scores = {key: scores[offsets[j]:offsets[j + 1]] for j, key in enumerate(keys)}
        orders = {}
        for key in self.groups:
            n = self.adapter.group_size(key)
            if n == 0:
                continue
            cand = it.candidates[str(key)]
            sc = cand_scores.get(key, np.zeros(0))
            prior = it.prior[str(key)]
            first = np.lexsort((prior[cand], sc)) if len(cand) else np.zeros(0, dtype=np.int64)
            rest = np.setdiff1d(np.arange(n), cand)
            rest = rest[np.argsort(prior[rest], kind="stable")]
            filler = float(sc.max()) if len(sc) else 0.0  # beyond the candidates: never cheaper than a candidate
            orders[key] = GroupOrder(units=np.concatenate([cand[first], rest]).astype(np.int64),
                                     scores=np.concatenate([sc[first], np.full(len(rest), filler)]),
                                     unit_params=self.adapter.params_per_unit(key), size=n,
                                     multiple=cfg.head_multiple if key.kind == "attention" else cfg.width_multiple,
                                     allowed=len(cand))
        if cfg.allocation != "uniform":
            picked = select_in_multiples(list(orders.values()), need)
            return dict(zip(orders, picked, strict=True))
        by_kind: dict[str, list[GroupKey]] = {}
        for key in orders:
            by_kind.setdefault(key.kind, []).append(key)
        for kind, group_keys in by_kind.items():
            if len({(orders[k].size, orders[k].allowed) for k in group_keys}) > 1:
                raise BonsaiError(f"--allocation uniform needs every layer to have the same {kind} size and candidates; "
                                  "this model's layers differ (prune the parent, or use --allocation global)")
        per_param = cfg.selection == "probe" and cfg.method in ("bonsai", "prior-only")
        kinds = {kind: [orders[k] for k in ks] for kind, ks in by_kind.items()}

        def removal(counts: dict[str, int]) -> dict[GroupKey, np.ndarray]:
            out = {}
            for kind, ks in by_kind.items():
                for key in ks:
                    steps = orders[key].steps()
                    stop = steps[counts[kind] - 1][1] if counts[kind] else 0
                    out[key] = np.sort(orders[key].units[:stop])
            return out

        left = self.budget.target_removed - (self.budget.block_params - self.adapter.block_parameters())
        options = uniform_options(kinds, need, per_param, remaining=left)
        if not options:  # not reachable this iteration: take everything allowed
            return removal({kind: min(len(o.steps()) for o in os_) for kind, os_ in kinds.items()})
        if not self._probes_splits() or len(options) < 2:
            return removal(options[0][1])
        return self._probe_splits(it, keys, windows, [(cost, counts, removal(counts))
                                                       for cost, counts in options[:cfg.split_probes]], progress)

    def _probe_splits(self, it: IterationState, keys, windows: torch.Tensor,
                      options: list[tuple[float, dict[str, int], dict[GroupKey, np.ndarray]]], progress
                      ) -> dict[GroupKey, np.ndarray]:
        """The least-cost uniform splits measured as whole sub-models (every layer's removal at once,
        compensated like the probes); the best measured is kept. The scores sum per-group probes, each of one
        layer alone, and a one-group difference in the split moves a third of every layer's attention (SmolLM2:
        one of three key-value groups), so their noise can flip the whole network's shape. Options that remove a
        unit outside a group's candidates (rounding to --head-multiple) cannot be compensated and are skipped;
        when the scores' own choice is among those, it stands."""
        cand = {k: set(it.candidates[str(k)].tolist()) for k in keys}

        def measurable(removed: dict[GroupKey, np.ndarray]) -> bool:
            return all(not len(units) or (key in cand and set(units.tolist()) <= cand[key])
                       for key, units in removed.items())

        usable = [o for o in options if measurable(o[2])]
        if len(usable) < 2 or usable[0] is not options[0]:
            return options[0][2]
        full = {}
        for key in keys:
            m = torch.ones(len(usable), self.adapter.group_size(key), dtype=torch.uint8)
            for row, (_, _, removed) in enumerate(usable):
                if len(removed.get(key, ())):
                    m[row, torch.from_numpy(removed[key])] = 0
            full[key] = m
        task = progress.add_task(f"split probes (iter {it.iteration + 1})", total=len(usable) * len(windows), info="")
        utility, _ = self._evaluator(it, keys, windows, full).evaluate(list(range(len(usable))),
                                                                       on_row=lambda: progress.advance(task))
        progress.remove_task(task)
        utility = np.where(np.isfinite(utility), utility, -np.inf)
        best = int(np.argmax(utility))  # ties: the cheaper by the scores
        self._split_record = [
            {"removed_per_layer": counts, "score_cost": float(cost), "utility": _finite_or_none(float(u)),
             "chosen": row == best} for row, ((cost, counts, _), u) in enumerate(zip(usable, utility, strict=True))]
        if best and self.dist.is_main:
            console.print(f"iteration {it.iteration + 1}: uniform split by measurement, per layer "
                          f"{usable[best][1]} instead of the scores' {usable[0][1]} (utility {utility[best]:.4f} "
                          f"against {utility[0]:.4f})")
        return usable[best][2]

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

    # ---- output ---------------------------------------------------------------------------
    def _report(self, state: RunState) -> dict:
        from bonsai.data import bos_record

        b = self.budget
        block_now = self.adapter.block_parameters()
        total_now = sum(p.numel() for p in self.model.parameters())
        return {
            "model": self.cfg.model,
            "settings": self.cfg.to_dict(),
            "seqlen": self.seqlen,
            "bos": bos_record(self.tokenizer, self.cfg.bos),
            "refit_windows": self._refit_windows,  # the refit's and the compensation statistics' windows
            "iterations": state.history,
            "totals": {
                "target_sparsity": self.cfg.sparsity,
                "sparsity": 1 - block_now / b.block_params,
                "fraction_of_all_params_removed": 1 - total_now / b.total_params,
                "target_reached": self._target_reached(),
                "block_params_before": b.block_params,
                "block_params_after": block_now,
                "params_before": b.total_params,
                "params_after": total_now,
                "max_unit_params": max(self.adapter.params_per_unit(k) for k in self.groups),
                "wall_seconds": state.elapsed_before,
                "peak_memory_bytes": self.peaks.peak(),
                "phase_peaks_exact": self.peaks.exact,  # False where the peak cannot be reset between phases
            },
            "kept_units": state.kept,
            "emptied_groups": emptied_groups(state.history, b.initial_units),
            "estimate": getattr(self, "_estimate", None),  # what the first line predicted (this process's start)
        }

    def _target_reached(self) -> bool:
        """Within one unit of the target (a group the refit emptied keeps a bias: a few parameters more)."""
        b = self.budget
        short = b.target_removed - (b.block_params - self.adapter.block_parameters())
        return short < min(self.adapter.params_per_unit(k) for k in self.groups)

    def _finish(self, state: RunState) -> dict:
        from bonsai.models.saving import save_pruned
        from bonsai.prune.report import plot_report

        report = self._report(state)
        staging = self.store.dir
        write_json_atomic(staging / "report.json", report)
        extra = {"report.json": staging / "report.json", ".bonsai": staging}
        try:
            plot_report(report, staging / "report.png")
            extra["report.png"] = staging / "report.png"
        except Exception as exc:  # a plot must never lose a finished run
            console.print(f"[yellow]could not draw report.png: {exc}")
        save_pruned(self.model, self.tokenizer, self.out, overwrite=True, extra_files=extra)
        for name in ("report.json", "report.png"):
            (self.out / ".bonsai" / name).unlink(missing_ok=True)
        return report


def _summary(removal: RemovalReport) -> dict | None:
    """Mean relative output error of the changed layers, dropped vs refit (report.json)."""
    groups = removal.groups
    if not groups:
        return None
    return {
        "layers": len(groups),
        "mean_error_dropped": float(np.mean([g["error_dropped"] for g in groups.values()])),
        "mean_error_refit": float(np.mean([g["error_refit"] for g in groups.values()])),
        "added_biases": removal.added_biases,
        "warnings": removal.warnings,
    }


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
