"""The allocation search of one iteration (`--search N`, `bonsai.methods.bonsai.allocation`): whole-network
sub-models over per-group removal counts around the probes' allocation, evaluated with the probes' machinery
(compensated masks on the live model, the KL utility), checkpointed as they go. A part of `PruneRun`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bonsai.adapters import GroupKey
from bonsai.engine import faults
from bonsai.engine.selection import changed_share, select_removals
from bonsai.methods.bonsai.allocation import (
    Ladder,
    gradient_steps,
    mutations,
    removed_params,
    sample_allocations,
    search_plan,
    shares,
    top_distinct,
)
from bonsai.methods.bonsai.report import finite_or_none
from bonsai.methods.bonsai.sampling import candidate_units, iteration_rng
from bonsai.methods.bonsai.state import IterationState
from bonsai.progress import console

SEARCH_WINDOWS, VERIFY_WINDOWS = 0, 1
VERIFIED = 3  # the best allocations by the search's windows that are verified on fresh ones (and the probes')
MUTATION_ROUND = 4  # offspring of the best so far per evolutionary round


class AllocationSearch:
    """Moving the probes' per-group allocation by measuring whole sub-models (a part of `PruneRun`)."""

    def _floor(self, key: GroupKey) -> int:
        """The candidates the probes measure in a group (its candidate floor): the lowest-prior
        candidate_multiple x p_iter of its units; the search's pool may be wider."""
        n = self.adapter.group_size(key)
        return len(candidate_units(np.zeros(n), self.budget.unit_p_iter, self.cfg.candidate_multiple))

    def _ladders(self, it: IterationState, keys, offsets, scores: np.ndarray, cand_prior: np.ndarray
                 ) -> list[Ladder]:
        """Each group's candidates in removal order: the probed ones (the floor) by their scores, then the rest of
        the search's pool by theirs (the deepest probe's slope), so that the probes' allocation is a prefix."""
        out = []
        for j, key in enumerate(keys):
            lo, hi = offsets[j], offsets[j + 1]
            cand, sc, pr = it.candidates[str(key)], scores[lo:hi], cand_prior[lo:hi]
            floor = self._floor(key)
            probed = np.zeros(len(cand), bool)
            probed[np.argsort(pr, kind="stable")[:floor]] = True
            order = np.lexsort((pr, sc, ~probed))
            out.append(Ladder(units=cand[order], scores=sc[order], unit_params=self.adapter.params_per_unit(key),
                              reach=min(floor, len(cand)), tiebreak=pr[order]))
        return out

    @staticmethod
    def _probes_allocation(ladders: list[Ladder], offsets, need: float) -> np.ndarray:
        """The probes' own removal counts: the global choice by score within each group's floor (what the run
        removes without the search: `select_removals` on the same scores and ties)."""
        scores = np.concatenate([np.where(np.arange(lad.size) < lad.reach, lad.scores, np.inf) for lad in ladders])
        params = np.concatenate([np.full(lad.size, lad.unit_params) for lad in ladders])
        drop = select_removals(scores, np.concatenate([lad.tiebreak for lad in ladders]), params, need)
        return np.array([int(((drop >= offsets[j]) & (drop < offsets[j + 1])).sum()) for j in range(len(ladders))])

    def _search_allocation(self, it: IterationState, keys, offsets, scores: np.ndarray, cand_prior: np.ndarray,
                           need: float, windows: torch.Tensor, progress) -> tuple[dict[GroupKey, np.ndarray], dict]:
        """The iteration's removal chosen by the allocation search, and its record for report.json."""
        start = time.time()
        ladders = self._ladders(it, keys, offsets, scores, cand_prior)
        base = self._probes_allocation(ladders, offsets, need)
        rows, utility, sources, fit = self._explore(it, keys, ladders, base, need, windows, progress)
        chosen, verified = self._verify(it, keys, ladders, rows, utility, progress)
        record = self._search_record(keys, ladders, offsets, rows, utility, sources, fit, chosen, verified)
        record["seconds"] = time.time() - start
        u = self.cfg.utility
        if self.dist.is_main and record[f"chosen_verified_{u}"] is not None and record[f"probes_verified_{u}"] is not None:
            console.print(f"iteration {it.iteration + 1}: allocation search kept the {sources[chosen]} allocation "
                          f"(verified {u} {record[f'chosen_verified_{u}']:.4g} against the probes' "
                          f"{record[f'probes_verified_{u}']:.4g}; {record['moved_share']:.0%} of the removal moved)")
        counts = rows[chosen]
        removed = {key: np.sort(lad.units[:c]) for key, lad, c in zip(keys, ladders, counts, strict=True) if c}
        return removed, record

    def _explore(self, it: IterationState, keys, ladders: list[Ladder], base: np.ndarray, need: float,
                 windows: torch.Tensor, progress) -> tuple[list[np.ndarray], np.ndarray, list[str], object]:
        """Allocations evaluated on the search's windows (the probes' first): antithetic samples, steps along the
        fitted gradient, mutations of the best so far. Returns them, their utilities, where each came from and the
        surrogate's fit (None when too few utilities were finite)."""
        from bonsai.methods.bonsai.regression import fit_unit_scores

        cfg = self.cfg
        windows, reference = self._search_windows(it, windows)
        rng = iteration_rng(cfg.seed, it.iteration, 3)
        pairs, steps, mutants = search_plan(cfg.search)

        def measured(new: list[np.ndarray]) -> np.ndarray:
            return self._allocation_utility(it, keys, ladders, new, windows, SEARCH_WINDOWS, progress, reference)

        rows = [base] + sample_allocations(base, ladders, pairs, cfg.search_scale, need, rng)
        sources = ["probes"] + ["sample"] * 2 * pairs
        utility = measured(rows)
        finite = np.isfinite(utility)
        fit = None
        if finite.sum() >= 4:
            X = np.stack([shares(r, base, ladders) for r in rows])[finite]
            fit = fit_unit_scores(X, utility[finite], "ridge", folds=cfg.cv_folds, seed=cfg.seed + it.iteration)
            proposals = gradient_steps(base, fit.beta, ladders, cfg.search_scale, need)[:steps]
            rows, sources = rows + proposals, sources + ["gradient"] * len(proposals)
            utility = np.concatenate([utility, measured(proposals)])
        while mutants > 0:
            best = rows[int(np.argmax(np.where(np.isfinite(utility), utility, -np.inf)))]
            children = mutations(best, ladders, min(MUTATION_ROUND, mutants), cfg.search_scale / 2, need, rng)
            if not children:
                break
            mutants -= len(children)
            rows, sources = rows + children, sources + ["mutation"] * len(children)
            utility = np.concatenate([utility, measured(children)])
        return rows, utility, sources, fit

    def _search_record(self, keys, ladders: list[Ladder], offsets, rows: list[np.ndarray], utility: np.ndarray,
                       sources: list[str], fit, chosen: int, verified: dict[int, float]) -> dict:
        """What report.json says of the search: where it started and ended, how far it moved the removal, what the
        verification measured (as KL, or LM loss with --utility loss: lower is better)."""
        u = self.cfg.utility
        sign = 1.0 if u == "kl" else -1.0
        params = np.concatenate([np.full(lad.size, lad.unit_params) for lad in ladders])

        def as_units(c: np.ndarray) -> np.ndarray:  # positions removed, in the ladders laid end to end
            return np.concatenate([offsets[j] + np.arange(c[j]) for j in range(len(ladders))]).astype(np.int64)

        def moved(i: int) -> float:
            return changed_share(as_units(rows[0]), as_units(rows[i]), params)

        def value(x: float) -> float | None:
            return finite_or_none(-sign * float(x))

        sampled = utility[[i for i, src in enumerate(sources) if src == "sample"]]
        return {
            "sub_models": len(rows), "verified": len(verified), "verify_windows": self._verify_count(),
            "surrogate_cv_tau": None if fit is None else finite_or_none(fit.cv_tau),
            "chosen": sources[chosen],
            f"probes_{u}": value(utility[0]),
            f"best_search_{u}": value(np.max(np.where(np.isfinite(utility), utility, -np.inf))),
            f"probes_verified_{u}": value(verified[0]),
            f"chosen_verified_{u}": value(verified[chosen]),
            "candidates": [{"source": sources[i], f"search_{u}": value(utility[i]), f"verified_{u}": value(v),
                            "moved_share": moved(i)} for i, v in verified.items()],
            # the sampled allocations' spread on the search's windows (best, median, worst): where a move lands
            f"sampled_{u}": [value(x) for x in np.quantile(sampled, [1.0, 0.5, 0.0])] if len(sampled) else [],
            "moved_share": moved(chosen),
            # how much lower the chosen allocation's verified value is than the probes' own (0 when they are kept)
            f"verified_{u}_fall": finite_or_none((verified[chosen] - verified[0]) / abs(verified[0]))
            if verified[0] else None,
            "beyond_floor": [str(k) for k, lad, c in zip(keys, ladders, rows[chosen], strict=True) if c > lad.reach],
            "removed_params": removed_params(rows[chosen], ladders),
            "probes_removed": {str(k): int(c) for k, c in zip(keys, rows[0], strict=True)},
            "chosen_removed": {str(k): int(c) for k, c in zip(keys, rows[chosen], strict=True)},
        }

    def _fresh_windows(self, it: IterationState, count: int, stream: int):
        """`count` calibration windows of their own (stream 1: the search's, 2: the verification's) and, for the KL
        utility, the current model's distributions on them."""
        from bonsai.data import calibration_windows
        from bonsai.methods.bonsai.evaluate import prior_pass

        cfg = self.cfg
        windows = calibration_windows(self.tokenizer, cfg.calib, count, self.seqlen,
                                      seed=cfg.seed * 100003 + it.iteration + 60011 + 10000 * stream, bos=self.bos)
        reference = None
        if cfg.utility == "kl":
            *_, reference = prior_pass(self.model, self.adapter, [], windows, "uniform", cfg.batch_size, reference=True)
        return windows, reference

    def _search_windows(self, it: IterationState, windows: torch.Tensor):
        """The windows the search's sub-models are scored on: the probes' (and their reference), or with
        --search-samples a draw of its own."""
        if not self.cfg.search_samples:
            return windows, None
        return self._fresh_windows(it, self.cfg.search_samples, 1)

    def _verify_count(self) -> int:
        return self.cfg.search_verify_samples or 4 * self.cfg.calib_samples

    def _verify(self, it: IterationState, keys, ladders: list[Ladder], rows: list[np.ndarray], utility: np.ndarray,
                progress) -> tuple[int, dict[int, float]]:
        """The best few allocations and the probes' own, evaluated again on fresh windows (the search chose among
        many on one small set: its best is flattered by that set's noise); the best verified is chosen."""
        picks = top_distinct(rows, utility, VERIFIED)
        if 0 not in picks:
            picks.append(0)
        fresh, reference = self._fresh_windows(it, self._verify_count(), 2)
        verified = self._allocation_utility(it, keys, ladders, [rows[i] for i in picks], fresh, VERIFY_WINDOWS,
                                            progress, reference=reference)
        scores = dict(zip(picks, verified.tolist(), strict=True))
        finite = {i: u for i, u in scores.items() if np.isfinite(u)}
        best = max(finite, key=lambda i: (finite[i], i == 0)) if finite else 0  # ties: the probes' own
        return best, scores

    def _allocation_utility(self, it: IterationState, keys, ladders: list[Ladder], rows: list[np.ndarray],
                            windows: torch.Tensor, window_set: int, progress, reference=None) -> np.ndarray:
        """Utilities of whole-network allocations (removal counts per group) on `windows`; those a checkpoint holds
        are read back, the others evaluated and checkpointed."""
        known = {(int(r[0]), tuple(int(x) for x in r[2:])): float(r[1]) for r in it.search}
        todo = [i for i, r in enumerate(rows) if (window_set, tuple(int(x) for x in r)) not in known]
        if todo:
            full = {}
            for j, key in enumerate(keys):
                m = torch.ones(len(todo), self.adapter.group_size(key), dtype=torch.uint8)
                for row, i in enumerate(todo):
                    if rows[i][j]:
                        m[row, torch.from_numpy(ladders[j].units[:rows[i][j]])] = 0
                full[key] = m
            label = "allocation search" if window_set == SEARCH_WINDOWS else "allocations verified"
            task = progress.add_task(f"{label} (iter {it.iteration + 1})", total=len(todo) * len(windows), info="")
            evaluator = self._evaluator(it, keys, windows, full, reference=reference)
            values, _ = evaluator.evaluate(list(range(len(todo))), on_row=lambda: progress.advance(task))
            progress.remove_task(task)
            new = np.array([[window_set, v, *rows[i]] for i, v in zip(todo, values.tolist(), strict=True)],
                           dtype=np.float64)
            it.search = np.concatenate([it.search.reshape(-1, new.shape[1]) if len(it.search) else
                                        np.zeros((0, new.shape[1])), new])
            if self.dist.is_main:
                self.store.save_iteration(it)
            known.update({(window_set, tuple(int(x) for x in rows[i])): v for i, v in zip(todo, values.tolist(),
                                                                                          strict=True)})
            self.evals_this_process += len(todo)
            faults.crash_after(faults.AFTER_EVALS, self.evals_this_process)
        return np.array([known[(window_set, tuple(int(x) for x in r))] for r in rows])
