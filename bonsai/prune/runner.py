"""`bonsai prune`: Algorithm 1 of the paper, iterated to the target sparsity, checkpointed and resumable.

Per iteration: prior on the current model -> fixed units and candidates per group -> sub-models and
their complements -> U by forward passes -> regression -> global removal by real parameter count ->
physical slicing. The ablations share the loop and differ only in how candidates are scored.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bonsai.adapters import GroupKey, get_adapter
from bonsai.adapters.base import ArchAdapter
from bonsai.distributed import Dist
from bonsai.errors import BonsaiError
from bonsai.io import write_json_atomic
from bonsai.progress import console, make_progress
from bonsai.prune.config import PruneConfig
from bonsai.prune.evaluate import SubModelEvaluator, prior_pass
from bonsai.prune.regression import fit_unit_scores
from bonsai.prune.sampling import candidate_units, sample_masks
from bonsai.prune.selection import select_removals
from bonsai.prune.state import IterationState, RunState, StateStore
from bonsai.runtime import peak_memory

ABORT_ENV = "BONSAI_ABORT_AFTER_EVALS"  # tests: simulate a crash after N sub-model evaluations


@dataclass
class Budget:
    block_params: int
    total_params: int
    prunable_params: int
    target_removed: float
    step: float
    iterations: int


def plan_budget(adapter: ArchAdapter, groups: list[GroupKey], cfg: PruneConfig) -> Budget:
    block = adapter.block_parameters()
    total = sum(p.numel() for p in adapter.model.parameters())
    prunable = sum(adapter.group_size(k) * adapter.params_per_unit(k) for k in groups)
    target = cfg.sparsity * block
    if target > prunable:
        raise BonsaiError(
            f"--sparsity {cfg.sparsity} would remove {target:,.0f} block parameters but only {prunable:,} are prunable "
            f"with --units {cfg.units}: this would remove every unit"
        )
    # Algorithm 1 runs ceil(p / p_iter) iterations; equal steps make the last one end at the target.
    iterations = max(1, math.ceil(cfg.sparsity / cfg.p_iter - 1e-9))
    return Budget(block, total, prunable, target, target / iterations, iterations)


def _rng(seed: int, iteration: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, iteration, stream])


class PruneRun:
    def __init__(self, cfg: PruneConfig, out_dir: str | Path, force: bool = False, model=None, tokenizer=None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.store = StateStore(self.out)
        self.dist = Dist()
        self._prepare_dir(force)
        from bonsai.eval.runner import default_seqlen
        from bonsai.models.loading import load_model, load_tokenizer

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        self.model = model if model is not None else load_model(cfg.model, dtype=cfg.dtype,
                                                                 device=self.dist.device(cfg.device),
                                                                 device_map=cfg.device_map)
        self.adapter = get_adapter(self.model)
        self.device = next(self.model.parameters()).device
        self.seqlen = default_seqlen(self.model.config, cfg.seqlen)
        self.groups = self.adapter.groups(cfg.unit_kinds)
        self.budget = plan_budget(self.adapter, self.groups, cfg)
        self.evals_this_process = 0

    # ---- output folder and state ---------------------------------------------------------
    def _prepare_dir(self, force: bool) -> None:
        if not self.out.exists():
            self.resuming = False
            return
        if force:
            self.dist.barrier()  # every process has looked before the folder goes
            if self.dist.is_main:
                shutil.rmtree(self.out)
            self.dist.barrier()
            self.resuming = False
            return
        if not self.store.exists():
            raise BonsaiError(f"output folder {self.out} already exists and holds no bonsai run; pass --force to replace it")
        state = self.store.load()
        if state.fingerprint != self.cfg.fingerprint():
            diff = sorted(k for k in set(state.fingerprint) | set(self.cfg.fingerprint())
                          if state.fingerprint.get(k) != self.cfg.fingerprint().get(k))
            raise BonsaiError(f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                              "pass --force to replace it or choose another --out")
        self.resuming = True

    def _initial_state(self) -> RunState:
        if self.resuming:
            state = self.store.load()
            self._restore(state)
            return state
        state = RunState(fingerprint=self.cfg.fingerprint(),
                         kept={str(k): list(range(self.adapter.group_size(k))) for k in self.groups},
                         started=time.time())
        self._save(state)
        return state

    def _save(self, state: RunState) -> None:
        if self.dist.is_main:
            self.store.save(state)

    def _restore(self, state: RunState) -> None:
        """Rebuild the pruned model of a previous process: one exact slicing of the original."""
        for key in self.groups:
            kept = state.kept[str(key)]
            if len(kept) != self.adapter.group_size(key):
                self.adapter.slice(key, torch.tensor(kept, dtype=torch.long))

    # ---- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        state = self._initial_state()
        if state.finished:
            console.print(f"{self.out} already holds the finished run; nothing to do")
            return self._report(state)
        t0 = time.time()
        b = self.budget
        if self.resuming and self.dist.is_main:
            console.print(f"resuming {self.out} at iteration {state.completed_iterations + 1}/{b.iterations}")
        with make_progress(disable=not self.dist.is_main) as progress:
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
                progress.update(it_task, completed=t + 1, info=f"sparsity {state.history[-1]['sparsity']:.3f}")
            progress.update(it_task, completed=b.iterations)
        state.finished = True
        self._save(state)
        report = self._finish(state) if self.dist.is_main else self._report(state)
        self.dist.barrier()
        return report

    def _iteration(self, t: int, state: RunState, progress) -> None:
        cfg, b, adapter = self.cfg, self.budget, self.adapter
        start = time.time()
        removed = b.block_params - adapter.block_parameters()
        need = min((t + 1) * b.step, b.target_removed) - removed
        windows = self._windows(t)
        it = self.store.load_iteration(t)
        if it is None:
            it = self._start_iteration(t, windows)
        it = self.dist.broadcast(it)  # every replica works from the main process's masks
        keys = [k for k in self.groups if len(it.candidates[str(k)])]
        offsets = np.cumsum([0] + [len(it.candidates[str(k)]) for k in keys])
        cand_prior = np.concatenate([it.prior[str(k)][it.candidates[str(k)]] for k in keys]) if keys else np.zeros(0)
        cand_params = np.concatenate([np.full(len(it.candidates[str(k)]), adapter.params_per_unit(k)) for k in keys]
                                     ) if keys else np.zeros(0)
        if cfg.method in ("bonsai", "no-regression"):
            self._evaluate_pending(it, keys, offsets, windows, progress)
        reg = None
        finite = np.isfinite(it.utility) & it.done
        if cfg.method == "bonsai":
            if finite.sum() < 4:
                console.print(f"[yellow]iteration {t + 1}: only {finite.sum()} finite utilities; scoring by the prior")
                scores = cand_prior
            else:
                reg = fit_unit_scores(it.masks[finite].astype(np.float64), it.utility[finite], cfg.regression,
                                      folds=cfg.cv_folds, seed=cfg.seed + t)
                scores = reg.beta
        elif cfg.method == "no-regression":
            scores = np.where(it.nr_count > 0, it.nr_sum / np.maximum(it.nr_count, 1), cand_prior)
        elif cfg.method == "prior-only":
            scores = cand_prior
        else:  # random
            scores = _rng(cfg.seed, t, 2).random(len(cand_prior))
        drop = self.dist.broadcast(select_removals(scores, cand_prior, cand_params, need))
        self._apply(keys, offsets, it, drop, state)
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
            "removed_units": len(drop),
            "candidates": len(cand_prior),
            "sub_models": int(it.done.sum()),
            "non_finite": n_bad,
            "cv_tau": None if reg is None else _finite_or_none(reg.cv_tau),
            "penalty": None if reg is None else reg.alpha,
            "calib_loss": it.base_loss,
            "calib_ppl": math.exp(it.base_loss) if it.base_loss < 700 else float("inf"),
            "seconds": time.time() - start,
        })

    def _windows(self, t: int) -> torch.Tensor:
        from bonsai.data import calibration_windows

        return calibration_windows(self.tokenizer, self.cfg.calib, self.cfg.calib_samples, self.seqlen,
                                   seed=self.cfg.seed * 100003 + t)

    def _start_iteration(self, t: int, windows: torch.Tensor) -> IterationState:
        cfg = self.cfg
        priors, base_loss = prior_pass(self.model, self.adapter, self.groups, windows, cfg.prior, cfg.batch_size)
        candidates = {str(k): candidate_units(priors[k], cfg.p_iter) for k in self.groups}
        cand_priors = [priors[k][candidates[str(k)]] for k in self.groups if len(candidates[str(k)])]
        total = sum(len(c) for c in cand_priors)
        n = cfg.samples if cfg.method in ("bonsai", "no-regression") else 0
        masks = sample_masks(cand_priors, n, _rng(cfg.seed, t, 1)) if n else np.zeros((0, total), np.uint8)
        it = IterationState(iteration=t, prior={str(k): v for k, v in priors.items()}, candidates=candidates,
                            masks=masks, utility=np.full(n, np.nan), done=np.zeros(n, bool), base_loss=base_loss,
                            nr_sum=np.zeros(total), nr_count=np.zeros(total))
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

    def _evaluate_pending(self, it: IterationState, keys, offsets, windows, progress) -> None:
        cfg = self.cfg
        pending = [i for i in range(len(it.masks)) if not it.done[i]]
        if not pending:
            return
        evaluator = SubModelEvaluator(self.model, self.adapter, keys, windows, self._full_masks(it, keys, offsets),
                                      cfg.batch_size, prior=cfg.prior if cfg.method == "no-regression" else None)
        task = progress.add_task(f"sub-models (iter {it.iteration + 1})", total=len(it.masks) * len(windows),
                                 completed=int(it.done.sum()) * len(windows), info="")
        abort_after = int(os.environ.get(ABORT_ENV, "0"))
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
            if abort_after and self.evals_this_process >= abort_after:
                os._exit(75)  # simulated crash, after the checkpoint, for the resume tests
        progress.remove_task(task)

    @staticmethod
    def _record(it: IterationState, keys, chunk: list[int], utility: np.ndarray, sample_prior) -> None:
        it.utility[chunk] = utility
        it.done[chunk] = True
        if sample_prior is not None:
            bits = it.masks[chunk].astype(np.float64)
            per_unit = np.concatenate([sample_prior[k][:, it.candidates[str(k)]] for k in keys], axis=1)
            it.nr_sum += (per_unit * bits).sum(0)
            it.nr_count += bits.sum(0)

    def _apply(self, keys, offsets, it: IterationState, drop: np.ndarray, state: RunState) -> None:
        for j, key in enumerate(keys):
            local = drop[(drop >= offsets[j]) & (drop < offsets[j + 1])] - offsets[j]
            if len(local) == 0:
                continue
            removed_units = set(it.candidates[str(key)][local].tolist())
            keep = [u for u in range(self.adapter.group_size(key)) if u not in removed_units]
            self.adapter.slice(key, torch.tensor(keep, dtype=torch.long))
            original = state.kept[str(key)]
            state.kept[str(key)] = [original[u] for u in keep]

    # ---- output ---------------------------------------------------------------------------
    def _report(self, state: RunState) -> dict:
        b = self.budget
        block_now = self.adapter.block_parameters()
        total_now = sum(p.numel() for p in self.model.parameters())
        return {
            "model": self.cfg.model,
            "settings": self.cfg.to_dict(),
            "seqlen": self.seqlen,
            "iterations": state.history,
            "totals": {
                "target_sparsity": self.cfg.sparsity,
                "sparsity": 1 - block_now / b.block_params,
                "fraction_of_all_params_removed": 1 - total_now / b.total_params,
                "block_params_before": b.block_params,
                "block_params_after": block_now,
                "params_before": b.total_params,
                "params_after": total_now,
                "max_unit_params": max(self.adapter.params_per_unit(k) for k in self.groups),
                "wall_seconds": state.elapsed_before,
                "peak_memory_bytes": peak_memory(self.device),
            },
            "kept_units": state.kept,
        }

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


def _finite_or_none(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
