import numpy as np
import pytest
from scipy.stats import kendalltau

from bonsai.methods.bonsai.regression import _tau, fit_unit_scores
from bonsai.methods.bonsai.sampling import sample_masks

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind,min_tau", [("lasso", 0.9), ("ridge", 0.7)])
def test_recovers_planted_sparse_beta(kind, min_tau):
    """L1 recovers a sparse planted beta; L2 (the paper's Phi-2 option) ranks less well on a sparse truth."""
    rng = np.random.default_rng(0)
    n_units, n_samples = 120, 200
    beta = np.zeros(n_units)
    important = rng.choice(n_units, 15, replace=False)
    beta[important] = rng.uniform(0.5, 2.0, 15)
    X = sample_masks([rng.uniform(0.5, 1.5, n_units)], n_samples, rng).astype(float)
    y = X @ beta + rng.normal(0, 0.05, n_samples)
    result = fit_unit_scores(X, y, kind, seed=0)
    # on fresh sub-models, predicted utilities rank like the planted (noise-free) ones
    X_new = sample_masks([rng.uniform(0.5, 1.5, n_units)], 400, rng).astype(float)
    tau = kendalltau(X_new @ result.beta, X_new @ beta).statistic
    assert tau > min_tau
    if kind == "lasso":
        assert kendalltau(result.beta[important], beta[important]).statistic > 0.9
        assert set(np.argsort(-result.beta)[:15]) == set(important)
    assert result.cv_tau > min_tau
    assert result.alpha in result.taus


def test_tau_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert _tau(a, b) == pytest.approx(kendalltau(a, b).statistic)
    assert np.isnan(_tau(np.ones(5), b[:5]))


def test_penalty_choice_is_by_kendall_tau():
    """The chosen alpha has the best CV tau of the grid."""
    rng = np.random.default_rng(2)
    X = rng.integers(0, 2, (60, 30)).astype(float)
    y = X[:, 0] * 3 - X[:, 1] + rng.normal(0, 0.1, 60)
    result = fit_unit_scores(X, y, "lasso", seed=0)
    finite = {a: t for a, t in result.taus.items() if np.isfinite(t)}
    assert result.cv_tau == pytest.approx(max(finite.values()))

