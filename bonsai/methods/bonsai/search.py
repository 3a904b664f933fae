"""The sub-model search of one iteration: the compensated statistics (unit errors and the candidates' H^-1
columns), the iteration's candidates and sub-models, and their evaluation by forward passes (all at once, or
in rounds that stop once the removal has settled: --adaptive). A part of `PruneRun`, which holds the state.
"""

from __future__ import annotations


import numpy as np
import torch

from bonsai.adapters import GroupKey
from bonsai.engine.compensation import group_statistics
from bonsai.engine.selection import (
    changed_share,
    select_removals,
)
from bonsai.engine import faults
from bonsai.progress import console
from bonsai.methods.bonsai.evaluate import SubModelEvaluator, prior_pass
from bonsai.methods.bonsai.priors import NEEDS_GRAM
from bonsai.methods.bonsai.regression import fit_unit_scores
from bonsai.methods.bonsai.sampling import candidate_units, iteration_rng, probe_masks, sample_masks
from bonsai.methods.bonsai.report import finite_or_none
from bonsai.methods.bonsai.state import IterationState

TAU_RISE = 0.01  # adaptive sampling: a CV tau higher than the last round's by more than this is still rising


class SubModelSearch:
    """Evaluating an iteration's sub-models (a part of `PruneRun`: its settings, model and state)."""

    def _needs_gram(self) -> bool:
        """Whether this run needs each group's Gram matrix at the start of an iteration."""
        cfg = self.cfg
        return cfg.prior in NEEDS_GRAM or cfg.selection == "probe" or (cfg.compensate and self._evaluates())

    def _evaluates(self) -> bool:
        return self.cfg.evaluates

    def _gram_pass(self, windows: torch.Tensor, priors: dict) -> tuple[dict, dict]:
        """Compensated unit errors of every group and, when sub-models are compensated, the candidates'
        columns of each H^-1 (kept in memory only, recomputed on resume). It reads the refit's windows: more
        tokens than the sub-models' windows (a Gram matrix is as wide as the layer), and independent of them,
        so a compensated sub-model is scored out of sample, as the final refit will be."""
        cfg = self.cfg

        def candidate_columns(key: GroupKey, errors: torch.Tensor) -> torch.Tensor:
            score = errors.numpy() if cfg.prior in NEEDS_GRAM else priors[key]
            cand = torch.from_numpy(candidate_units(score, self.budget.unit_p_iter, cfg.pool_multiple))
            width = self.adapter.unit_width(key)
            return (cand[:, None] * width + torch.arange(width)[None, :]).reshape(-1)

        def pool(key: GroupKey) -> int:  # the candidates' count, ordered by sequential OBS when asked
            if not cfg.sequential_obs:
                return 0
            n = self.adapter.group_size(key)
            return len(candidate_units(np.zeros(n), self.budget.unit_p_iter, cfg.pool_multiple))

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
        candidates = {str(k): candidate_units(priors[k], self.budget.unit_p_iter, cfg.pool_multiple)
                      for k in self.groups}
        cand_priors = [priors[k][candidates[str(k)]] for k in self.groups if len(candidates[str(k)])]
        total = sum(len(c) for c in cand_priors)
        n = cfg.samples if self._evaluates() else 0
        if n and cfg.selection == "probe":
            # the probes measure each group's floor; the allocation search's pool beyond it is priced by their slope
            reach = [self._floor(k) for k in self.groups if len(candidates[str(k)])]
            masks = probe_masks(cand_priors, levels=cfg.probe_depths, reach=reach)
            n = len(masks)
        else:
            masks = sample_masks(cand_priors, n, iteration_rng(cfg.seed, t, 1)) if n else np.zeros((0, total), np.uint8)
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
                "curve": [{"sub_models": int(e), "cv_tau": finite_or_none(tau), "changed": ch}
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
                   prior: str | None = None, reference=None) -> SubModelEvaluator:
        """An evaluator of sub-models given as full per-group masks, compensated as the probes are; what a resumed
        run lost (the Gram pass, the reference distributions) is recomputed the same way. `reference`: the
        current model's distributions on other `windows` than the iteration's (the KL utility)."""
        cfg = self.cfg
        compensation = None
        if cfg.compensate:
            if self._compensation is None:  # resumed mid-iteration: the same pass again
                _, self._compensation = self._gram_pass(self._recon_windows(it.iteration),
                                                        {GroupKey.parse(k): v for k, v in it.prior.items()})
            # every replica compensates with the main process's matrices (other thread counts round differently)
            compensation = self._compensation = self.dist.broadcast(self._compensation)
        if cfg.utility == "kl" and self._reference is None and reference is None:  # resumed mid-iteration
            *_, self._reference = prior_pass(self.model, self.adapter, [], windows, "uniform", cfg.batch_size,
                                             reference=True)
        return SubModelEvaluator(self.model, self.adapter, keys, windows, full_masks, cfg.batch_size, prior=prior,
                                 compensation=compensation,
                                 candidates={k: torch.from_numpy(it.candidates[str(k)]) for k in keys},
                                 reference=(self._reference if reference is None else reference) if cfg.utility == "kl" else None)

    @staticmethod
    def _record(it: IterationState, keys, chunk: list[int], utility: np.ndarray, sample_prior) -> None:
        it.utility[chunk] = utility
        it.done[chunk] = True
        if sample_prior is not None:
            bits = it.masks[chunk].astype(np.float64)
            per_unit = np.concatenate([sample_prior[k][:, it.candidates[str(k)]] for k in keys], axis=1)
            it.nr_sum += (per_unit * bits).sum(0)
            it.nr_count += bits.sum(0)
