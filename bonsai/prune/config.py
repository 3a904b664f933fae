"""Settings of a prune run: defaults, YAML presets under configs/, validation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from bonsai.errors import BonsaiError

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
METHODS = ("bonsai", "prior-only", "no-regression", "random")
PRIOR_NAMES = ("wanda", "activation", "magnitude", "uniform")
UNIT_KINDS = ("attention", "mlp")


@dataclass
class PruneConfig:
    """Defaults are the paper's LLaMA-2-7B settings (Table 9)."""

    model: str = "tiny"
    sparsity: float = 0.5
    method: str = "bonsai"
    prior: str = "wanda"
    p_iter: float = 0.05
    samples: int = 200
    calib: str = "wikitext2"
    calib_samples: int = 32
    seqlen: int | None = None
    batch_size: int = 1
    regression: str = "lasso"
    cv_folds: int = 5
    units: str = "attention,mlp"
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    checkpoint_every: int = 10

    @property
    def unit_kinds(self) -> tuple[str, ...]:
        return tuple(u.strip() for u in self.units.split(",") if u.strip())

    def validate(self) -> PruneConfig:
        if not 0 < self.sparsity < 1:
            raise BonsaiError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if not 0 < self.p_iter <= self.sparsity:
            raise BonsaiError(f"--p-iter must be in (0, sparsity={self.sparsity}], got {self.p_iter}")
        if self.samples < 4:
            raise BonsaiError(f"--samples must be at least 4 (got {self.samples})")
        if self.method not in METHODS:
            raise BonsaiError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.prior not in PRIOR_NAMES:
            raise BonsaiError(f"unknown prior {self.prior!r}: choose from {', '.join(PRIOR_NAMES)}")
        if self.regression not in ("lasso", "ridge"):
            raise BonsaiError(f"unknown regression {self.regression!r}: choose lasso or ridge")
        bad = [u for u in self.unit_kinds if u not in UNIT_KINDS] or (not self.unit_kinds and ["(none)"])
        if bad:
            raise BonsaiError(f"unknown --units {','.join(bad)}: use attention, mlp or attention,mlp")
        if self.calib_samples < 1:
            raise BonsaiError(f"--calib-samples must be at least 1 (got {self.calib_samples})")
        if self.seqlen is not None and self.seqlen < 2:
            raise BonsaiError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if self.batch_size < 1:
            raise BonsaiError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.cv_folds < 2:
            raise BonsaiError(f"cv_folds must be at least 2 (got {self.cv_folds})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> dict:
        """Settings that determine the result; a resumed run must match them."""
        d = self.to_dict()
        for k in ("device", "device_map", "checkpoint_every", "batch_size"):
            d.pop(k)
        return d


def find_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise BonsaiError(f"config not found: {name} (looked in {CONFIG_DIR})")


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
    return PruneConfig(**values).validate()
