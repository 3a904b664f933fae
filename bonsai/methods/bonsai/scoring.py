"""How each candidate unit is scored for removal (lower = removed first), per selection and method.

probe (default): each group's measured cost, spread over its candidates by their compensated errors and
divided by their parameter counts (utility lost per parameter). paper: the regression coefficient of each
unit (Eq. 3), or the ablations' scores (prior, per-sub-model prior, random).
"""

from __future__ import annotations

import numpy as np

from bonsai.progress import console
from bonsai.methods.settings import PruneConfig
from bonsai.methods.bonsai.regression import RegressionResult, fit_unit_scores
from bonsai.methods.bonsai.state import IterationState


def unit_scores(cfg: PruneConfig, it: IterationState, keys, offsets: np.ndarray, cand_prior: np.ndarray,
                cand_params: np.ndarray, t: int, fitted: RegressionResult | None = None
                ) -> tuple[np.ndarray, RegressionResult | None, dict | None]:
    """Scores of the candidates (in `keys` order), the regression record (paper) and the probes' costs.
    `fitted`: the regression already fit on exactly the evaluated sub-models (adaptive sampling's last round)."""
    if cfg.selection == "probe" and cfg.method in ("bonsai", "prior-only"):
        cand_error = np.concatenate([it.unit_error[str(k)][it.candidates[str(k)]] for k in keys]) if keys else np.zeros(0)
        probe = None
        if cfg.method == "bonsai":
            unit_beta, probe = probe_unit_costs(it, keys, offsets, cand_error, base=cfg.utility == "loss")
        else:  # no measurement: one common sensitivity, the compensated errors alone decide
            unit_beta = np.ones(len(cand_error))
        return unit_beta * cand_error / cand_params, None, probe
    if cfg.method == "bonsai":
        finite = np.isfinite(it.utility) & it.done
        if finite.sum() < 4:
            console.print(f"[yellow]iteration {t + 1}: only {finite.sum()} finite utilities; scoring by the prior")
            return cand_prior, None, None
        reg = fitted or fit_unit_scores(it.masks[finite].astype(np.float64), it.utility[finite], cfg.regression,
                                        folds=cfg.cv_folds, seed=cfg.seed + t)
        return (reg.beta / cand_params if cfg.per_parameter else reg.beta), reg, None
    if cfg.method == "no-regression":
        return np.where(it.nr_count > 0, it.nr_sum / np.maximum(it.nr_count, 1), cand_prior), None, None
    if cfg.method == "prior-only":
        return cand_prior, None, None
    rng = np.random.default_rng([cfg.seed, t, 2])  # random
    return rng.random(len(cand_prior)), None, None


def probe_unit_costs(it: IterationState, keys, offsets: np.ndarray, cand_error: np.ndarray, base: bool = True
                         ) -> tuple[np.ndarray, dict]:
    """Per candidate unit: the measured loss increase per unit of compensated error at its depth in its group.

    Each probe sub-model dropped the d lowest-prior candidates of one group; with the measured loss increases
    dL(d) (d = 0 < d_1 < ... < c) and the summed compensated errors E(d) of those units, the units ranked in
    (d_{j-1}, d_j] get (dL(d_j) - dL(d_{j-1})) / (E(d_j) - E(d_{j-1})): a piecewise-linear cost curve per group."""
    increase = -it.utility - (it.base_loss if base else 0.0)  # per probe sub-model (KL utility: 0 for the model itself)
    beta = np.full(len(cand_error), np.nan)
    probed = np.zeros(len(cand_error), bool)  # priced by a measured segment (not the deepest probe's extrapolation)
    record = {}
    for j, key in enumerate(keys):
        lo, hi = offsets[j], offsets[j + 1]
        rows = np.flatnonzero((it.masks[:, lo:hi] == 0).any(1) & it.done)
        depth = (it.masks[rows, lo:hi] == 0).sum(1)
        order = np.argsort(it.prior[str(key)][it.candidates[str(key)]], kind="stable")
        err = cand_error[lo:hi]
        prev_d, prev_loss, prev_e = 0, 0.0, 0.0
        slope = np.nan
        for d, loss in sorted(zip(depth.tolist(), increase[rows].tolist(), strict=True)):
            e_sum = float(err[order[:d]].sum())
            slope = np.inf if not np.isfinite(loss) else (loss - prev_loss) / max(e_sum - prev_e, 1e-30)
            beta[lo + order[prev_d:d]] = slope
            probed[lo + order[prev_d:d]] = True
            prev_d, prev_loss, prev_e = d, loss, e_sum
        beta[lo + order[prev_d:]] = slope  # beyond the deepest probe (the allocation search's wider pool): its slope
        record[str(key)] = float(prev_loss)
    positive = beta[probed & np.isfinite(beta) & (beta > 0)]
    floor = 1e-3 * float(np.median(positive)) if len(positive) else 1.0
    beta = np.where(np.isnan(beta), floor, beta)  # units of a group never probed (cannot happen) and
    return np.maximum(beta, floor), record      # measured gains from removal: the smallest cost
