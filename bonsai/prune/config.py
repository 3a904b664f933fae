"""Settings of a prune run: defaults, YAML presets (package data under bonsai/configs/), validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import yaml

from bonsai.errors import BonsaiError
from bonsai.presets import find_config

# what a run checkpointed before a setting existed did, where that differs from the setting's default now
LEGACY_SETTINGS = {"sequential_obs": False, "split_probes": 1, "refit_target": "own", "bos": "never"}
PAPER_P_ITER = 0.05  # Table 9: 5% of the model per iteration
# The probe selection's step: one iteration up to 30%, equal steps of at most 0.3 beyond (50%: two of 0.25).
# Fewer, larger steps measured as good or better, and the run costs a third of p_iter 0.1 (docs/quality.md).
PROBE_P_ITER = 0.3
# Without a refit the probes are not compensated, and a probe that drops 60% of a group (p_iter 0.3) measures a
# damage far from linear: steps of 0.1 measured better there (SmolLM2 30%, --reconstruct none: 72.3 against
# 76.4 on seed 0; docs/quality.md, last section).
PROBE_P_ITER_UNREFIT = 0.1
BONSAI_METHODS = ("bonsai", "prior-only", "no-regression", "random")
BASELINE_METHODS = ("wanda", "llm-pruner", "besa", "flap")
METHODS = BONSAI_METHODS + BASELINE_METHODS
# Each baseline's own calibration defaults (used unless the preset or a flag sets them).
METHOD_DEFAULTS = {
    "wanda": {"calib": "c4", "calib_samples": 128},  # Wanda: 128 x 2048 tokens of C4
    "besa": {"calib": "c4", "calib_samples": 128},  # BESA: 128 x 2048 tokens of C4, 1 epoch
    "llm-pruner": {"calib_samples": 10, "seqlen": 128},  # LLM-Pruner: 10 samples of 128 tokens
    "flap": {"calib_samples": 1024, "seqlen": 128},  # FLAP: 1024 samples of 128 tokens (wikitext2)
}
STRUCTURED_METHODS = BONSAI_METHODS + ("llm-pruner", "flap")
SELECTIONS = ("probe", "paper")
UNIT_KINDS = ("attention", "mlp")


@dataclass
class PruneConfig:
    """Defaults are the paper's LLaMA-2-7B settings (Table 9)."""

    model: str = "tiny"
    sparsity: float = 0.5
    method: str = "bonsai"
    prior: str = "obs"
    p_iter: float | None = None  # None: PROBE_P_ITER for bonsai's probe selection (PROBE_P_ITER_UNREFIT without a
    # refit), else the paper's PAPER_P_ITER
    samples: int = 200
    calib: str = "wikitext2"
    calib_samples: int = 32
    seqlen: int | None = None
    # every window starts as the family is run: with the BOS token when the tokenizer adds one (bonsai.data.windows)
    bos: str = "auto"
    batch_size: int = 1
    regression: str = "lasso"
    cv_folds: int = 5
    # how sub-models are drawn and read: probe (one sub-model per group and depth, each group's measured cost
    # spread over its units by their compensated errors) or paper (random unit masks, one regression
    # coefficient per unit)
    selection: str = "probe"
    candidate_multiple: float = 2.0  # each group's candidates: the lowest multiple x p_iter of its units (paper: 2)
    probe_depths: int = 1  # probe: depths measured per group (1: its whole candidate set); --samples is the paper's
    # paper selection: evaluate in rounds and stop once the removal decision has converged (--samples the maximum).
    # None: on for bonsai's paper selection (0.33-0.39x the sub-models at equal perplexity on four models,
    # docs/benchmarks.md), off otherwise; the paper-* presets turn it off to run the paper's algorithm as published
    adaptive: bool | None = None
    adaptive_round: int = 0  # sub-models per round (0: a tenth of --samples, at least 8, even: pairs stay together)
    adaptive_tol: float = 0.3  # stop when the parameters whose fate changed since the last round are below this share
    # evaluate sub-models with their dropped units compensated (the lstsq refit to come); None: on with
    # --reconstruct lstsq only; with none no refit comes (SmolLM2 30%, seed 0: 86.8 ppl without against 107.7 with)
    compensate: bool | None = None
    # obs prior under the lstsq refit: rank each group's units along its greedy joint removal (sequential OBS)
    # instead of by each unit's error alone. None: on for bonsai's probe selection with --prior obs and the lstsq
    # refit (SmolLM2 30%, three seeds: 60.86 against 61.28 ppl, lower on every seed; docs/quality.md row 19)
    sequential_obs: bool | None = None
    utility: str = "kl"  # U of a sub-model: -(KL from the current model's next-token distributions), or -(LM loss)
    # serving shapes: every layer's MLP width / attention units a multiple of N, or every layer the same
    width_multiple: int = 1
    head_multiple: int = 1
    allocation: str = "global"
    # --allocation uniform takes each kind's step in every layer at once, so the attention/MLP split is one coarse
    # choice for the whole network: bonsai measures the N least-cost splits (by the scores) as compensated
    # sub-models and keeps the best (1: the scores alone decide; SmolLM2 50%, docs/quality.md last section)
    split_probes: int = 3
    per_parameter: bool = False  # paper selection: rank units by beta per parameter instead of beta
    units: str = "attention,mlp"
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    checkpoint_every: int = 10
    # --- reconstruction after every removal (every structured method)
    reconstruct: str | None = None  # lstsq for structured methods, none for unstructured ones (nothing to refit)
    reconstruct_damp: float = 1e-2
    reconstruct_samples: int | None = None  # windows for the refit (default: calib_samples)
    # what lstsq fits each output projection to: the residual stream of the model before the removal (every block
    # from the first pruned one refit, so the drift of earlier layers is undone too), or its own output before it.
    # Residual measured lower for every method (SmolLM2 30%, three seeds: bonsai 55.6 against 58.0, FLAP 58.7
    # against 63.9; docs/quality.md, last section)
    refit_target: str = "residual"
    # --- Wanda / BESA (unstructured baselines)
    sparsity_type: str = "unstructured"
    # --- LLM-Pruner
    llmp_importance: str = "element1"
    llmp_aggregation: str = "sum"
    llmp_layer_start: int | None = None
    llmp_layer_end: int | None = None
    global_ranking: bool = False
    # --- BESA
    besa_granularity: str = "row"
    besa_levels: int = 100
    besa_epochs: int = 1
    besa_lr: float = 5e-2
    besa_penalty: float = 5.0
    besa_wbits: int | None = None

    def __post_init__(self) -> None:
        if self.adaptive is None:  # resolved here, so the fingerprint and the report hold what the run did
            self.adaptive = self.selection == "paper" and self.method == "bonsai"

    @property
    def unit_kinds(self) -> tuple[str, ...]:
        return tuple(u.strip() for u in self.units.split(",") if u.strip())

    def validate(self) -> PruneConfig:
        if not 0 < self.sparsity < 1:
            raise BonsaiError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if self.reconstruct is None:  # first: the default step depends on it
            self.reconstruct = "lstsq" if self.method in STRUCTURED_METHODS else "none"
        if self.p_iter is None:  # resolved here, so the fingerprint and the report hold what the run did
            probe = self.method == "bonsai" and self.selection == "probe"
            step = (PROBE_P_ITER if self.reconstruct != "none" else PROBE_P_ITER_UNREFIT) if probe else PAPER_P_ITER
            self.p_iter = min(step, self.sparsity)
        if not 0 < self.p_iter <= self.sparsity:
            raise BonsaiError(f"--p-iter must be in (0, sparsity={self.sparsity}], got {self.p_iter}")
        if self.samples < 4:
            raise BonsaiError(f"--samples must be at least 4 (got {self.samples})")
        if self.method not in METHODS:
            raise BonsaiError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        from bonsai.prune.priors import PRIOR_NAMES

        if self.prior not in PRIOR_NAMES:
            raise BonsaiError(f"unknown prior {self.prior!r}: choose from {', '.join(PRIOR_NAMES)}")
        if self.utility not in ("loss", "kl"):
            raise BonsaiError(f"unknown --utility {self.utility!r}: choose loss or kl")
        if self.selection not in SELECTIONS:
            raise BonsaiError(f"unknown --selection {self.selection!r}: choose from {', '.join(SELECTIONS)}")
        if self.width_multiple < 1 or self.head_multiple < 1:
            raise BonsaiError("--width-multiple and --head-multiple must be at least 1")
        if self.allocation not in ("global", "uniform"):
            raise BonsaiError(f"unknown --allocation {self.allocation!r}: choose global or uniform")
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
        from bonsai.prune.regression import REGRESSIONS

        if self.regression not in REGRESSIONS:
            raise BonsaiError(f"unknown regression {self.regression!r}: choose from {', '.join(REGRESSIONS)}")
        bad = [u for u in self.unit_kinds if u not in UNIT_KINDS] or (not self.unit_kinds and ["(none)"])
        if bad:
            raise BonsaiError(f"unknown --units {','.join(bad)}: use attention, mlp or attention,mlp")
        from bonsai.data.windows import BOS_MODES

        if self.bos not in BOS_MODES:
            raise BonsaiError(f"unknown --bos {self.bos!r}: choose from {', '.join(BOS_MODES)}")
        if self.calib_samples < 1:
            raise BonsaiError(f"--calib-samples must be at least 1 (got {self.calib_samples})")
        if self.seqlen is not None and self.seqlen < 2:
            raise BonsaiError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if self.batch_size < 1:
            raise BonsaiError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.method in BASELINE_METHODS:
            self._validate_baseline()
        from bonsai.engine.refit import RECONSTRUCT_MODES

        if self.compensate is None:
            self.compensate = self.reconstruct == "lstsq"  # the probes' compensation is the lstsq refit's
        if self.sequential_obs is None:
            self.sequential_obs = (self.prior == "obs" and self.reconstruct == "lstsq" and self.method == "bonsai"
                                   and self.selection == "probe")
        if self.sequential_obs and (self.prior != "obs" or self.reconstruct != "lstsq"
                                    or self.method not in BONSAI_METHODS):
            raise BonsaiError("--sequential-obs orders units by their compensated errors: it needs --prior obs and "
                              "--reconstruct lstsq with a bonsai method")
        if self.reconstruct not in RECONSTRUCT_MODES:
            raise BonsaiError(f"unknown --reconstruct {self.reconstruct!r}: choose from {', '.join(RECONSTRUCT_MODES)}")
        if self.reconstruct != "none" and self.method not in STRUCTURED_METHODS:
            raise BonsaiError(f"--reconstruct {self.reconstruct} refits the layers of structured methods; "
                              f"{self.method} keeps every shape (use --reconstruct none)")
        from bonsai.engine.refit import REFIT_TARGETS

        if self.refit_target not in REFIT_TARGETS:
            raise BonsaiError(f"unknown --refit-target {self.refit_target!r}: choose from {', '.join(REFIT_TARGETS)}")
        if not 0 <= self.reconstruct_damp < 1e3:
            raise BonsaiError(f"--reconstruct-damp must be >= 0 (got {self.reconstruct_damp})")
        if self.reconstruct_samples is not None and self.reconstruct_samples < 1:
            raise BonsaiError(f"--reconstruct-samples must be at least 1 (got {self.reconstruct_samples})")
        if self.cv_folds < 2:
            raise BonsaiError(f"cv_folds must be at least 2 (got {self.cv_folds})")
        return self

    def _validate_baseline(self) -> None:
        from bonsai.baselines.llm_pruner import AGGREGATIONS, IMPORTANCES
        from bonsai.baselines.wanda import parse_sparsity_type

        if self.method in ("wanda", "besa"):
            parse_sparsity_type(self.sparsity_type, self.sparsity)
        if self.method == "besa" and self.sparsity_type != "unstructured":
            raise BonsaiError("BESA learns unstructured per-layer sparsities; --sparsity-type must be unstructured")
        if self.method == "llm-pruner":
            if self.llmp_importance not in IMPORTANCES:
                raise BonsaiError(f"unknown --llmp-importance {self.llmp_importance!r}: choose from {', '.join(IMPORTANCES)}")
            if self.llmp_aggregation not in AGGREGATIONS:
                raise BonsaiError(f"unknown --llmp-aggregation {self.llmp_aggregation!r}: "
                                  f"choose from {', '.join(AGGREGATIONS)}")
        if self.besa_granularity not in ("layer", "row"):
            raise BonsaiError(f"--besa-granularity must be layer or row (got {self.besa_granularity!r})")
        if self.besa_levels < 2 or self.besa_epochs < 1 or self.besa_lr <= 0 or self.besa_penalty < 0:
            raise BonsaiError("--besa-levels >= 2, --besa-epochs >= 1, --besa-lr > 0 and --besa-penalty >= 0 are required")
        if self.besa_wbits is not None and not 2 <= self.besa_wbits <= 8:
            raise BonsaiError(f"--besa-wbits must be between 2 and 8 (got {self.besa_wbits})")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def round_size(self) -> int:
        """Sub-models per adaptive round: whole (sample, complement) pairs."""
        size = self.adaptive_round or max(8, -(-self.samples // 10))
        return size + size % 2

    def fingerprint(self) -> dict:
        """Settings that determine the result; a resumed run must match them."""
        d = self.to_dict()
        for k in ("device", "device_map", "checkpoint_every", "batch_size"):
            d.pop(k)
        return d




def load_config_file(name: str) -> dict:
    path = find_config(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BonsaiError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(PruneConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BonsaiError(f"{path}: unknown keys {', '.join(unknown)}")
    return data


def build_config(config_file: str | None, overrides: dict) -> PruneConfig:
    """Defaults, then the YAML preset, then every CLI flag the user actually gave."""
    values = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key, value in METHOD_DEFAULTS.get(values.get("method", "bonsai"), {}).items():
        values.setdefault(key, value)
    return PruneConfig(**values).validate()
