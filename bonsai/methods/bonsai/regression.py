"""Regressing sub-model utility on unit masks (paper Eq. 3), penalty chosen by held-out Kendall tau.

scikit-learn fits the model (Lasso for L1, Ridge for L2); scipy gives Kendall tau. The penalty whose
out-of-fold predictions rank the held-out utilities best is chosen, then refit on all samples
(Appendix A.1: only the ranking of sub-models matters, not matching U exactly).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

# scikit-learn and scipy are imported where they are used: the default probe selection never regresses, and
# together they hold 150 MB of a process's memory (a tenth of Gemma-3-270M's inference budget)
REGRESSIONS = ("lasso", "ridge")


@dataclass
class RegressionResult:
    beta: np.ndarray
    alpha: float
    cv_tau: float
    taus: dict[float, float]


def _path(kind: str, X: np.ndarray, y: np.ndarray, alphas: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Coefficients for every alpha (columns), with the intercept handled by centring.

    Lasso uses scikit-learn's warm-started coordinate-descent path: at LLaMA-7B scale (~35k candidate
    units) separate fits per penalty and fold were >10x slower. Ridge solves in kernel form (n << p).
    """
    from sklearn.linear_model import Ridge, lasso_path

    x_mean, y_mean = X.mean(0), y.mean()
    Xc, yc = X - x_mean, y - y_mean
    if kind == "lasso":
        _, coefs, _ = lasso_path(Xc, yc, alphas=alphas, tol=1e-4, max_iter=5000)
    elif kind == "ridge":
        coefs = np.stack([Ridge(alpha=a, fit_intercept=False).fit(Xc, yc).coef_ for a in alphas], axis=1)
    else:
        raise ValueError(f"unknown regression {kind!r}")
    return coefs, x_mean, y_mean


def alpha_grid(kind: str, X: np.ndarray, y: np.ndarray, n: int = 12) -> np.ndarray:
    """Lasso: alpha_max (all-zero solution) down four decades; Ridge: a wide log grid scaled to X."""
    if kind == "lasso":
        Xc, yc = X - X.mean(0), y - y.mean()
        alpha_max = float(np.abs(Xc.T @ yc).max() / len(y)) if len(y) else 1.0
        alpha_max = alpha_max if alpha_max > 0 else 1.0
        return alpha_max * np.logspace(-0.05, -4, n)
    return np.logspace(-3, 4, n) * max(1.0, float(X.var(0).sum()) / max(X.shape[1], 1))


def _tau(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(kendalltau(a, b).statistic)


def fit_unit_scores(X: np.ndarray, y: np.ndarray, kind: str = "lasso", folds: int = 5, seed: int = 0,
                    alphas: np.ndarray | None = None) -> RegressionResult:
    """beta (one score per column of X: the utility a present unit adds) and the CV record."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import KFold

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    alphas = alpha_grid(kind, X, y) if alphas is None else np.asarray(alphas, dtype=np.float64)
    folds = max(2, min(folds, len(y)))
    splits = list(KFold(n_splits=folds, shuffle=True, random_state=seed).split(X))
    taus: dict[float, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pred = np.empty((len(y), len(alphas)))
        for train, test in splits:
            coefs, x_mean, y_mean = _path(kind, X[train], y[train], alphas)
            pred[test] = (X[test] - x_mean) @ coefs + y_mean
        for j, alpha in enumerate(alphas):
            taus[float(alpha)] = _tau(pred[:, j], y)
        valid = {a: t for a, t in taus.items() if np.isfinite(t)}
        # best tau; among equals the stronger penalty (the simpler model)
        best = max(valid, key=lambda a: (round(valid[a], 12), a)) if valid else float(alphas[-1])
        j_best = [float(a) for a in alphas].index(best)
        coefs, _, _ = _path(kind, X, y, alphas[: j_best + 1])  # the path down to the chosen penalty
        beta = coefs[:, -1]
    return RegressionResult(beta=np.asarray(beta, dtype=np.float64), alpha=best,
                            cv_tau=taus.get(best, float("nan")), taus=taus)

