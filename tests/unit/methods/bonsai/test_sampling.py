import numpy as np
import pytest

from bonsai.methods.bonsai.sampling import candidate_units, sample_keep, sample_masks

pytestmark = pytest.mark.unit


def test_candidates_are_lowest_prior_and_fixed_units_excluded():
    prior = np.array([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 6.0, 7.0, 8.0, 9.0])
    cand = candidate_units(prior, 0.1)  # 2 * 0.1 * 10 = 2 candidates
    assert list(cand) == [1, 3]
    cand = candidate_units(prior, 0.25)  # 5 candidates, the top 5 fixed
    assert set(cand) == {1, 2, 3, 4, 5}
    assert len(candidate_units(prior, 0.01)) == 1  # never empty for a non-empty group
    assert len(candidate_units(np.zeros(0), 0.1)) == 0


def test_complements_are_exact():
    rng = np.random.default_rng(0)
    priors = [rng.uniform(size=7), rng.uniform(size=12), rng.uniform(size=1)]
    masks = sample_masks(priors, 10, rng)
    assert masks.shape == (10, 20)
    for i in range(0, 10, 2):
        assert np.array_equal(masks[i + 1], 1 - masks[i])
        # each sampled mask keeps ceil(n/2) candidates of every group
        assert masks[i][:7].sum() == 4 and masks[i][7:19].sum() == 6


def test_sampling_favours_high_prior_units():
    rng = np.random.default_rng(0)
    prior = np.array([0.01, 0.01, 1.0, 1.0])
    kept = np.mean([sample_keep(prior, rng) for _ in range(2000)], axis=0)
    assert kept[2] > 0.8 and kept[0] < 0.2


def test_same_seed_same_masks():
    priors = [np.linspace(0.1, 1, 9)]
    a = sample_masks(priors, 8, np.random.default_rng([3, 1, 1]))
    b = sample_masks(priors, 8, np.random.default_rng([3, 1, 1]))
    assert np.array_equal(a, b)


def test_probe_masks_drop_one_group_at_each_depth():
    from bonsai.methods.bonsai.sampling import probe_depths, probe_masks

    priors = [np.array([0.3, 0.1, 0.2, 0.9]), np.array([0.5]), np.array([0.4, 0.8, 0.6, 0.1, 0.2, 0.7])]
    masks = probe_masks(priors, levels=2)
    assert probe_depths(4, 2) == [2, 4] and probe_depths(1, 2) == [1] and probe_depths(6, 2) == [3, 6]
    assert masks.shape == (2 + 1 + 2, 11)
    offsets = [0, 4, 5, 11]
    expect_groups = [0, 0, 1, 2, 2]
    for row, group in zip(masks, expect_groups, strict=True):
        dropped = np.flatnonzero(row == 0)
        assert dropped.min() >= offsets[group] and dropped.max() < offsets[group + 1]  # one group only
        local = dropped - offsets[group]
        order = np.argsort(priors[group], kind="stable")
        assert set(local) == set(order[:len(local)])  # its lowest-prior candidates


def test_candidate_multiple_widens_the_pool_by_prior():
    import numpy as np

    from bonsai.methods.bonsai.sampling import candidate_units

    prior = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 8.0, 7.0, 6.0, 0.5])
    assert list(candidate_units(prior, 0.1)) == [1, 9]  # the paper's 2 x p_iter: the two lowest
    assert list(candidate_units(prior, 0.1, multiple=4)) == [1, 3, 4, 9]  # four lowest, in index order
    assert len(candidate_units(prior, 0.1, multiple=10)) == 10
