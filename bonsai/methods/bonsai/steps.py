"""Removal in whole steps: the same step in every layer of a kind (--allocation uniform) or multiples of N units
(--width-multiple, --head-multiple), and the attention/MLP splits measured as sub-models. A part of `PruneRun`.
"""

from __future__ import annotations


import numpy as np
import torch

from bonsai.adapters import GroupKey
from bonsai.engine.selection import (
    GroupOrder,
    select_in_multiples,
    uniform_options,
)
from bonsai.errors import BonsaiError
from bonsai.progress import console
from bonsai.methods.bonsai.report import finite_or_none
from bonsai.methods.bonsai.state import IterationState


class StepSelection:
    """Choosing an iteration's removal in whole steps (a part of `PruneRun`)."""

    def _probes_splits(self) -> bool:
        """Whether uniform allocation's attention/MLP split is measured (bonsai's sub-models) or scored only."""
        cfg = self.cfg
        return cfg.allocation == "uniform" and cfg.method == "bonsai" and cfg.split_probes > 1

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
            {"removed_per_layer": counts, "score_cost": float(cost), "utility": finite_or_none(float(u)),
             "chosen": row == best} for row, ((cost, counts, _), u) in enumerate(zip(usable, utility, strict=True))]
        if best and self.dist.is_main:
            console.print(f"iteration {it.iteration + 1}: uniform split by measurement, per layer "
                          f"{usable[best][1]} instead of the scores' {usable[0][1]} (utility {utility[best]:.4f} "
                          f"against {utility[0]:.4f})")
        return usable[best][2]
