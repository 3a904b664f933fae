"""`bonsai prune --search N` (the allocation search) end to end on the shipped tiny model."""

import sys

import pytest
from helpers import assert_within_one_unit, crash_resume_and_straight

from bonsai.errors import BonsaiError
from bonsai.methods.bonsai.runner import PruneRun
from bonsai.methods.settings import PruneConfig

pytestmark = pytest.mark.integration

SMALL = dict(model="tiny", sparsity=0.2, p_iter=0.2, calib="kjv", seqlen=32, calib_samples=4, batch_size=8,
             checkpoint_every=4)


def _prune(out, **kw):
    cfg = PruneConfig(**{**SMALL, **kw}).validate()
    run = PruneRun(cfg, out)
    return run, run.run()


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    return {name: _prune(root / name, **kw) for name, kw in
            {"probes": {}, "search": dict(search=8, search_samples=6, search_verify_samples=4)}.items()}


def test_search_starts_from_the_probes_allocation_and_keeps_the_budget(searched):
    """Row 0 of the search is the default run's removal, the chosen allocation is what the saved model lost, and
    the target is met within one unit either side."""
    (probe_run, probe_report), (run, report) = searched["probes"], searched["search"]
    record = report["iterations"][0]["allocation_search"]
    assert probe_report["iterations"][0]["allocation_search"] is None
    parent = probe_report["iterations"][0]
    default_removed = {f"{i}.{kind}": probe_run.budget.initial_units[f"{i}.{kind}"] - left
                       for kind in ("attention", "mlp") for i, left in enumerate(parent[f"{kind}_units"])}
    assert {k: v for k, v in record["probes_removed"].items() if v} == {k: v for k, v in default_removed.items() if v}
    for kind in ("attention", "mlp"):
        for i, left in enumerate(report["iterations"][0][f"{kind}_units"]):
            key = f"{i}.{kind}"
            assert run.budget.initial_units[key] - left == record["chosen_removed"].get(key, 0)
    assert record["sub_models"] == 9  # the probes' allocation and eight more
    assert 1 <= record["verified"] <= 4
    assert record["chosen_verified_kl"] <= record["probes_verified_kl"]
    fall = (record["probes_verified_kl"] - record["chosen_verified_kl"]) / record["probes_verified_kl"]
    assert record["verified_kl_fall"] == pytest.approx(fall) and fall >= 0
    assert (record["chosen"] == "probes") == (record["moved_share"] == 0)
    assert record["surrogate_cv_tau"] is None or -1 <= record["surrogate_cv_tau"] <= 1
    assert_within_one_unit(report, 0.2, report["totals"]["max_unit_params"])


def test_search_refuses_what_it_cannot_move(tmp_path):
    for kw, match in [(dict(search=4), "at least 8"), (dict(search=8, selection="paper"), "probe selection"),
                      (dict(search=8, allocation="uniform"), "allocation global"),
                      (dict(search=8, search_pool=1.5), "search-pool")]:
        with pytest.raises(BonsaiError, match=match):
            PruneConfig(**{**SMALL, **kw}).validate()


@pytest.mark.heavy
def test_search_resume_equals_uninterrupted(tmp_path):
    """Killed inside the allocation search (after its first stage, checkpointed), the rerun finishes with the
    uninterrupted run's bytes and the same search record."""
    args = [sys.executable, "-m", "bonsai", "prune", "--model", "tiny", "--sparsity", "0.2", "--p-iter", "0.2",
            "--calib", "kjv", "--seqlen", "32", "--calib-samples", "4", "--batch-size", "8", "--search", "12",
            "--search-verify-samples", "4"]
    # 10 probes (5 layers x 2 kinds), then 7 allocations (the probes' and three pairs): dies after those 17
    ra, rb = (iters[0]["allocation_search"] for iters in crash_resume_and_straight(args, tmp_path, "17"))
    for key in ("chosen", "probes_removed", "chosen_removed", "probes_kl", "chosen_verified_kl"):
        assert ra[key] == rb[key], key
