"""Settings of a prune run: the shared ones (model, target, calibration, refit, serving shapes, device) here, each
method's own in its module (`bonsai.methods.registry`); `PruneConfig` is all of them together, so one flat object
holds what a run did (report.json, the resume fingerprint and the YAML presets keep one key per setting).
Defaults, then a YAML preset (package data under bonsai/configs/), then the flags a user gave; then validation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, make_dataclass

import yaml

import bonsai.methods  # noqa: F401  (every method registered: their settings make up PruneConfig)
from bonsai.errors import BonsaiError
from bonsai.methods.registry import METHODS, MethodSpec, get_method, option
from bonsai.presets import find_config

# what a run checkpointed before a setting existed did, where that differs from the setting's default now
LEGACY_SETTINGS = {"sequential_obs": False, "split_probes": 1, "refit_target": "own", "bos": "never"}
UNIT_KINDS = ("attention", "mlp")
ALLOCATIONS = ("global", "uniform")
# --help panels of the shared settings
RUN, CALIB, REFIT, SHAPES, DEVICES = ("The run", "Calibration", "Reconstruction (every structured method)",
                                      "Serving shapes and units", "Devices and resume")


@dataclass
class RunSettings:
    """What every method shares. A method's own settings come after these (`PruneConfig`)."""

    model: str = option("tiny", "Model folder, Hugging Face id, or alias (see `bonsai models`; `tiny` is the shipped "
                        "model).", "--model", "-m", panel=RUN)
    sparsity: float = option(0.5, "Fraction of transformer-block parameters to remove, in (0,1).", panel=RUN)
    method: str = option("bonsai", "", panel=RUN)  # help: the registry's names (bonsai.cli.prune)
    seed: int = option(0, "Random seed (same seed, same model).", panel=RUN)
    calib: str = option("wikitext2", "Calibration data: wikitext2, c4, kjv, austen or a local file; several joined "
                        "by + are mixed (austen+kjv).", panel=CALIB)
    calib_samples: int = option(32, "Calibration windows (default 32).", panel=CALIB)
    seqlen: int | None = option(None, "Calibration window length (default 2048 capped at max positions).", panel=CALIB)
    # every window starts as the family is run: with the BOS token when the tokenizer adds one (bonsai.data.windows)
    bos: str = option("auto", "", panel=CALIB)  # help: BOS_HELP
    batch_size: int = option(1, "Rows per forward pass (rows may mix sub-models).", "--batch-size", "-b", panel=CALIB)
    # --- reconstruction after every removal (every structured method)
    reconstruct: str | None = option(None, "Refit after each removal (every structured method): lstsq (least-squares "
                                     "output projections, default) | bias (FLAP's) | none (the paper's Bonsai).",
                                     panel=REFIT)  # None: lstsq for structured methods, none for the others
    reconstruct_damp: float = option(1e-2, "lstsq damping, relative to the Gram matrix's mean diagonal (0.01).",
                                     panel=REFIT)
    reconstruct_samples: int | None = option(None, "Calibration windows for the refit and the compensation "
                                             "statistics (default: 16 tokens per input column of the widest output "
                                             "projection, at least --calib-samples).", panel=REFIT)
    # what lstsq fits each output projection to: the residual stream of the model before the removal (every block
    # from the first pruned one refit, so the drift of earlier layers is undone too), or its own output before it.
    # Residual measured lower for every method (SmolLM2 30%, three seeds: bonsai 55.6 against 58.0, FLAP 58.7
    # against 63.9; docs/quality.md, last section)
    refit_target: str = option("residual", "What lstsq fits each output projection to: residual (the residual stream "
                               "of the model before the removal, default; every block from the first pruned one is "
                               "refit) | own (its own output before it).", panel=REFIT)
    # serving shapes: every layer's MLP width / attention units a multiple of N, or every layer the same
    width_multiple: int = option(1, "Keep every layer's MLP width a multiple of N (0 allowed): widths that tile and "
                                 "quantise well (llama.cpp K-quants need 256).", panel=SHAPES)
    head_multiple: int = option(1, "Keep every layer's attention units (key/value groups) a multiple of N.",
                                panel=SHAPES)
    allocation: str = option("global", "global (per-layer sizes, default) | uniform (the same sizes in every layer: a "
                             "stock config every engine loads).", panel=SHAPES)
    units: str = option("attention,mlp", "Unit kinds to prune: attention,mlp (default), attention or mlp.",
                        panel=SHAPES)
    dtype: str = option("auto", "auto|float32|bfloat16|float16.", panel=DEVICES)
    device: str = option("auto", "auto|cpu|cuda|cuda:N.", panel=DEVICES)
    device_map: str | None = option(None, "accelerate placement (e.g. auto) for models larger than one device.",
                                    panel=DEVICES)
    checkpoint_every: int = option(10, "Save state every N sub-models (default 10).", panel=DEVICES)

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    @property
    def unit_kinds(self) -> tuple[str, ...]:
        return tuple(u.strip() for u in self.units.split(",") if u.strip())

    def __post_init__(self) -> None:
        for settings in method_settings():
            if hasattr(settings, "settle"):
                settings.settle(self)

    def validate(self) -> PruneConfig:
        if not 0 < self.sparsity < 1:
            raise BonsaiError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        spec = self.spec  # an unknown method stops here
        if self.reconstruct is None:  # first: other defaults depend on it
            self.reconstruct = "lstsq" if spec.structured else "none"
        for settings in method_settings():  # every method's, since the fingerprint holds them all resolved
            if hasattr(settings, "check"):
                settings.check(self)
        if self.width_multiple < 1 or self.head_multiple < 1:
            raise BonsaiError("--width-multiple and --head-multiple must be at least 1")
        if self.allocation not in ALLOCATIONS:
            raise BonsaiError(f"unknown --allocation {self.allocation!r}: choose global or uniform")
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
        from bonsai.engine.refit import RECONSTRUCT_MODES, REFIT_TARGETS

        if self.reconstruct not in RECONSTRUCT_MODES:
            raise BonsaiError(f"unknown --reconstruct {self.reconstruct!r}: choose from {', '.join(RECONSTRUCT_MODES)}")
        if self.reconstruct != "none" and not spec.structured:
            raise BonsaiError(f"--reconstruct {self.reconstruct} refits the layers of structured methods; "
                              f"{self.method} keeps every shape (use --reconstruct none)")
        if self.refit_target not in REFIT_TARGETS:
            raise BonsaiError(f"unknown --refit-target {self.refit_target!r}: choose from {', '.join(REFIT_TARGETS)}")
        if not 0 <= self.reconstruct_damp < 1e3:
            raise BonsaiError(f"--reconstruct-damp must be >= 0 (got {self.reconstruct_damp})")
        if self.reconstruct_samples is not None and self.reconstruct_samples < 1:
            raise BonsaiError(f"--reconstruct-samples must be at least 1 (got {self.reconstruct_samples})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """Settings that determine the result; a resumed run must match them."""
        d = self.to_dict()
        for k in ("device", "device_map", "checkpoint_every", "batch_size"):
            d.pop(k)
        return d


def method_settings() -> list[type]:
    """Every registered method's settings class, once each, in registration order."""
    return list(dict.fromkeys(spec.settings for spec in METHODS.values()))


# One flat dataclass of the shared settings and every method's: its fields are the YAML keys, report.json's
# "config" and the resume fingerprint, as they were before methods had settings of their own.
PruneConfig = make_dataclass("PruneConfig", [], bases=(RunSettings, *reversed(method_settings())))
PruneConfig.__doc__ = "A prune run's settings: the shared ones (`RunSettings`) and every method's own."
PruneConfig.__module__ = __name__


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
    """Defaults, then the YAML preset, then every CLI flag the user actually gave, then the method's own
    calibration defaults (the paper's) for what none of those set."""
    values = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    method = values.get("method", "bonsai")
    if method in METHODS:  # an unknown one is refused by validate, in one line
        for key, value in METHODS[method].calibration.items():
            values.setdefault(key, value)
    return PruneConfig(**values).validate()
