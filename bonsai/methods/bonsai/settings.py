"""Bonsai's own settings: the sub-model search (the probe selection, the default, or the paper's selection with its
ablations), registered as `bonsai`, `prior-only`, `no-regression` and `random`. Defaults are the paper's LLaMA-2-7B
settings (Table 9) except where docs/quality.md measured better.
"""

from __future__ import annotations

from dataclasses import dataclass

from bonsai.errors import BonsaiError
from bonsai.methods.registry import option, register_method

PAPER_P_ITER = 0.05  # Table 9: 5% of the model per iteration
# The probe selection's step: one iteration up to 30%, equal steps of at most 0.3 beyond (50%: two of 0.25).
# Fewer, larger steps measured as good or better, and the run costs a third of p_iter 0.1 (docs/quality.md).
PROBE_P_ITER = 0.3
# Without a refit the probes are not compensated, and a probe that drops 60% of a group (p_iter 0.3) measures a
# damage far from linear: steps of 0.1 measured better there (SmolLM2 30%, --reconstruct none: 72.3 against
# 76.4 on seed 0; docs/quality.md, last section).
PROBE_P_ITER_UNREFIT = 0.1
SELECTIONS = ("probe", "paper")
UTILITIES = ("kl", "loss")
PANEL = "Bonsai selection (default)"
PAPER_PANEL = "Paper selection (--selection paper) and ablations"
SEARCH_PANEL = "Allocation search (bonsai, --search N)"
RUNNER = "bonsai.methods.bonsai.runner:PruneRun"
VARIANTS = {  # name -> summary; every variant runs the same search with these settings
    "bonsai": "sub-models measured by forward passes, units removed globally (the default)",
    "prior-only": "ablation (paper Fig. 2): units removed by the prior alone, no sub-models",
    "no-regression": "ablation (paper Fig. 2): sub-model utilities averaged per unit instead of regressed",
    "random": "ablation (paper Fig. 2): random units removed",
}


@dataclass
class BonsaiSettings:
    PANEL = PANEL

    prior: str = option("obs", "obs (default: each unit's error after the run's refit, relative to the residual "
                        "stream) | wanda | activation | magnitude | uniform (paper Fig. 3).")
    # None: PROBE_P_ITER for bonsai's probe selection (PROBE_P_ITER_UNREFIT without a refit), else PAPER_P_ITER
    p_iter: float | None = option(None, "Fraction pruned per iteration (default: 0.3 for bonsai's probe selection, 0.1 "
                                  "for it with --reconstruct none, the paper's 0.05 otherwise).")
    probe_depths: int = option(1, "probe selection: depths probed per layer group (default 1: one sub-model per "
                               "group, 2L per iteration).")
    candidate_multiple: float = option(2.0, "Candidates per layer group and iteration: the lowest multiple x p_iter "
                                       "of its units by prior (default 2, the paper's; the rest are fixed).")
    # probe (one sub-model per group and depth, each group's measured cost spread over its units by their
    # compensated errors) or paper (random unit masks, one regression coefficient per unit)
    selection: str = option("probe", "probe (default): one sub-model per layer group, its measured cost spread over "
                            "its units by their compensated errors | paper: random unit masks, one regression "
                            "coefficient per unit.")
    # None: on with --reconstruct lstsq only; with none no refit comes (SmolLM2 30%, seed 0: 86.8 ppl without
    # against 107.7 with)
    compensate: bool | None = option(None, "Evaluate sub-models with their dropped units compensated (the refit to "
                                     "come; default with --reconstruct lstsq) instead of zeroed (the paper).",
                                     "--compensate/--no-compensate")
    # None: on for bonsai's probe selection with --prior obs and the lstsq refit (SmolLM2 30%, three seeds: 60.86
    # against 61.28 ppl, lower on every seed; docs/quality.md row 19)
    sequential_obs: bool | None = option(None, "Rank each group's candidates along their greedy joint removal "
                                         "(sequential OBS: remove the cheapest, update, repeat) instead of by each "
                                         "unit's compensated error alone (default with --prior obs, --reconstruct "
                                         "lstsq and the probe selection).", "--sequential-obs/--no-sequential-obs")
    utility: str = option("kl", "A sub-model's utility: kl (default: -KL from the current model's next-token "
                          "distributions) | loss (-LM loss, the paper's).")
    samples: int = option(200, "paper selection: sub-models evaluated per iteration (default 200).", panel=PAPER_PANEL)
    # None: on for bonsai's paper selection (0.33-0.39x the sub-models at equal perplexity on four models,
    # docs/benchmarks.md), off otherwise; the paper-* presets turn it off to run the paper's algorithm as published
    adaptive: bool | None = option(None, "paper selection: evaluate sub-models in rounds and stop an iteration once "
                                   "the units it would remove have settled (--samples the maximum; default on with "
                                   "--selection paper, off in the paper-* presets).", "--adaptive/--no-adaptive",
                                   panel=PAPER_PANEL)
    adaptive_round: int = option(0, "--adaptive: sub-models per round (even; default a tenth of --samples, at least "
                                 "8).", panel=PAPER_PANEL)
    adaptive_tol: float = option(0.3, "--adaptive: stop when at most this share of the parameters to remove changed "
                                 "since the last round (default 0.3).", panel=PAPER_PANEL)
    regression: str = option("lasso", "lasso (L1, default) | ridge (L2).", panel=PAPER_PANEL)
    cv_folds: int = 5  # folds of the penalty's held-out Kendall tau (a preset may set it; no flag)
    per_parameter: bool = option(False, "paper selection: rank units by coefficient per parameter.",
                                 "--per-parameter/--per-unit", panel=PAPER_PANEL)
    # --allocation uniform takes each kind's step in every layer at once, so the attention/MLP split is one coarse
    # choice for the whole network: bonsai measures the N least-cost splits (by the scores) as compensated
    # sub-models and keeps the best (1: the scores alone decide; SmolLM2 50%, docs/quality.md last section)
    split_probes: int = option(3, "--allocation uniform with bonsai: measure the N least-cost attention/MLP splits "
                               "as sub-models and keep the best (default 3; 1: the scores alone decide).",
                               panel="Serving shapes and units")

    # the allocation search (issue 41): whole-network sub-models over per-group removal counts, around the probes'
    # allocation (bonsai.methods.bonsai.allocation); off by default until measured better (docs/quality.md)
    search: int = option(0, "Allocation search: evaluate N whole-network sub-models that move each layer group's "
                         "share of the removal around the probes' allocation, regress their utility on the shares, "
                         "keep the best verified on fresh windows (default 0: off; 32 is a sensible size).",
                         panel=SEARCH_PANEL)
    search_pool: float | None = option(None, "--search: the largest share of a group one iteration may remove, as "
                                       "a multiple of p_iter (default 3, at most 1/p_iter; the probes' own floor is "
                                       "--candidate-multiple).",
                                panel=SEARCH_PANEL)
    search_scale: float = option(0.05, "--search: the spread of the sampled moves, as a share of each group's pool "
                                 "(default 0.05).", panel=SEARCH_PANEL)
    search_samples: int | None = option(None, "--search: calibration windows each whole-network sub-model is scored "
                                        "on (default: the probes' --calib-samples windows).", panel=SEARCH_PANEL)
    search_verify_samples: int | None = option(None, "--search: fresh calibration windows the best allocations are "
                                               "verified on (default 4 x --calib-samples).", panel=SEARCH_PANEL)

    def settle(self) -> None:
        """Defaults that depend on other settings, resolved when the settings are made, so that the fingerprint
        and the report hold what the run did."""
        if self.adaptive is None:
            self.adaptive = self.selection == "paper" and self.method == "bonsai"

    def check(self) -> None:
        """Resolve the remaining defaults and refuse what cannot run (called for every method: a baseline's
        fingerprint holds these resolved values too)."""
        if self.p_iter is None:
            probe = self.method == "bonsai" and self.selection == "probe"
            step = (PROBE_P_ITER if self.reconstruct != "none" else PROBE_P_ITER_UNREFIT) if probe else PAPER_P_ITER
            self.p_iter = min(step, self.sparsity)
        if not 0 < self.p_iter <= self.sparsity:
            raise BonsaiError(f"--p-iter must be in (0, sparsity={self.sparsity}], got {self.p_iter}")
        if self.samples < 4:
            raise BonsaiError(f"--samples must be at least 4 (got {self.samples})")
        from bonsai.methods.bonsai.priors import PRIOR_NAMES

        if self.prior not in PRIOR_NAMES:
            raise BonsaiError(f"unknown prior {self.prior!r}: choose from {', '.join(PRIOR_NAMES)}")
        if self.utility not in UTILITIES:
            raise BonsaiError(f"unknown --utility {self.utility!r}: choose loss or kl")
        if self.selection not in SELECTIONS:
            raise BonsaiError(f"unknown --selection {self.selection!r}: choose from {', '.join(SELECTIONS)}")
        if self.split_probes < 1:
            raise BonsaiError(f"--split-probes must be at least 1 (got {self.split_probes})")
        if not 1 <= self.candidate_multiple <= 1 / self.p_iter + 1e-9:
            raise BonsaiError(f"--candidate-multiple must be in [1, 1/p_iter = {1 / self.p_iter:g}] "
                              f"(got {self.candidate_multiple})")
        if self.probe_depths < 1:
            raise BonsaiError(f"--probe-depths must be at least 1 (got {self.probe_depths})")
        if self.adaptive and (self.selection != "paper" or self.method != "bonsai"):
            raise BonsaiError("--adaptive stops the paper selection's sampling early: use it with --selection paper "
                              "(the probe selection evaluates one sub-model per layer group, nothing to stop)")
        if self.adaptive_round < 0 or self.adaptive_round % 2:
            raise BonsaiError(f"--adaptive-round must be an even number of sub-models (got {self.adaptive_round})")
        if not 0 <= self.adaptive_tol < 1:
            raise BonsaiError(f"--adaptive-tol must be in [0, 1) (got {self.adaptive_tol})")
        if self.method == "no-regression" and self.selection != "paper":
            raise BonsaiError("no-regression is an ablation of the paper's regression: use it with --selection paper")
        from bonsai.methods.bonsai.regression import REGRESSIONS

        if self.regression not in REGRESSIONS:
            raise BonsaiError(f"unknown regression {self.regression!r}: choose from {', '.join(REGRESSIONS)}")
        if self.compensate is None:
            self.compensate = self.reconstruct == "lstsq"  # the probes' compensation is the lstsq refit's
        if self.sequential_obs is None:
            self.sequential_obs = (self.prior == "obs" and self.reconstruct == "lstsq" and self.method == "bonsai"
                                   and self.selection == "probe")
        if self.sequential_obs and (self.prior != "obs" or self.reconstruct != "lstsq" or not self.spec.searches):
            raise BonsaiError("--sequential-obs orders units by their compensated errors: it needs --prior obs and "
                              "--reconstruct lstsq with a bonsai method")
        self._check_search()
        if self.cv_folds < 2:
            raise BonsaiError(f"cv_folds must be at least 2 (got {self.cv_folds})")

    def _check_search(self) -> None:
        if self.search < 0:
            raise BonsaiError(f"--search must be 0 (off) or a number of sub-models (got {self.search})")
        if not self.search:
            return
        if self.search_pool is None:
            self.search_pool = max(self.candidate_multiple, min(3.0, 1 / self.p_iter))
        if self.search < 8:
            raise BonsaiError(f"--search needs at least 8 sub-models (got {self.search})")
        if self.method != "bonsai" or self.selection != "probe":
            raise BonsaiError("--search moves the probes' allocation: use it with --method bonsai and the probe "
                              "selection")
        if self.allocation != "global" or self.width_multiple > 1 or self.head_multiple > 1:
            raise BonsaiError("--search chooses per-layer sizes: use it with --allocation global and without "
                              "--width-multiple / --head-multiple")
        if not self.candidate_multiple <= self.search_pool <= 1 / self.p_iter + 1e-9:
            raise BonsaiError(f"--search-pool must be in [--candidate-multiple = {self.candidate_multiple:g}, "
                              f"1/p_iter = {1 / self.p_iter:g}] (got {self.search_pool})")
        if not 0 < self.search_scale <= 1:
            raise BonsaiError(f"--search-scale must be in (0, 1] (got {self.search_scale})")
        if self.search_samples is not None and self.search_samples < 1:
            raise BonsaiError(f"--search-samples must be at least 1 (got {self.search_samples})")
        if self.search_verify_samples is not None and self.search_verify_samples < 1:
            raise BonsaiError(f"--search-verify-samples must be at least 1 (got {self.search_verify_samples})")

    @property
    def pool_multiple(self) -> float:
        """Candidates per group and iteration, as a multiple of p_iter: the search's wider pool when it runs."""
        return max(self.candidate_multiple, self.search_pool) if self.search else self.candidate_multiple

    @property
    def evaluates(self) -> bool:
        """Whether this variant measures sub-models (prior-only and random do not)."""
        return self.method in ("bonsai", "no-regression")

    @property
    def round_size(self) -> int:
        """Sub-models per adaptive round: whole (sample, complement) pairs."""
        size = self.adaptive_round or max(8, -(-self.samples // 10))
        return size + size % 2


for _name, _summary in VARIANTS.items():
    register_method(_name, RUNNER, _summary, structured=True, searches=True)(BonsaiSettings)
