"""Settings of a finetune run. Defaults are the paper's LLaMA recipe (Table 10): LoRA on all block linears,
rank 128, alpha 4 x rank, lr 1e-4, distillation weight 0.01."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import yaml

from bonsai.engine.divergence import KL_DIRECTIONS
from bonsai.errors import BonsaiError
from bonsai.presets import CONFIG_DIR, find_config

# what a run checkpointed before a setting existed did, where that differs from the setting's default now
LEGACY_SETTINGS = {"bos": "never"}


@dataclass
class FinetuneConfig:
    model: str = "tiny"
    teacher: str | None = None
    data: str = "wikitext2"
    lora_rank: int = 128
    lora_alpha: float | None = None  # None: 4 x rank
    lora_dropout: float = 0.05
    full: bool = False
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    distill_weight: float = 0.01
    kl_direction: str = "forward"
    top_k: int = 64
    seqlen: int = 512
    bos: str = "auto"  # windows start as the family is run (bonsai.data.windows)
    samples: int | None = None
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    eval_windows: int = 32
    eval_every: int | None = None  # None: five times per run
    checkpoint_every: int = 200
    log_every: int = 10
    merge: bool = True
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    cache_dir: str | None = None

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else 4 * self.lora_rank

    def validate(self) -> FinetuneConfig:
        if self.lora_rank <= 0:
            raise BonsaiError(f"--lora-rank must be positive (got {self.lora_rank})")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise BonsaiError(f"--lora-alpha must be positive (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise BonsaiError(f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.lr <= 0:
            raise BonsaiError(f"--lr must be positive (got {self.lr})")
        if self.distill_weight < 0:
            raise BonsaiError(f"--distill-weight must be >= 0 (got {self.distill_weight})")
        if self.distill_weight > 0 and not self.teacher:
            raise BonsaiError("--teacher (the parent model) is required for distillation; "
                              "pass --distill-weight 0 to train without it")
        if self.kl_direction not in KL_DIRECTIONS:
            raise BonsaiError(f"--kl-direction must be one of {', '.join(KL_DIRECTIONS)}")
        for name in ("top_k", "epochs", "batch_size", "grad_accum", "eval_windows", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise BonsaiError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("steps", "samples", "eval_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise BonsaiError(f"--{name} must be at least 1 (got {value})")
        if self.seqlen < 2:
            raise BonsaiError(f"--seqlen must be at least 2 (got {self.seqlen})")
        from bonsai.data.windows import BOS_MODES

        if self.bos not in BOS_MODES:
            raise BonsaiError(f"unknown --bos {self.bos!r}: choose from {', '.join(BOS_MODES)}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_alpha"] = self.alpha
        return d

    def fingerprint(self) -> dict:
        """Settings a resumed run must share with the interrupted one."""
        d = self.to_dict()
        for k in ("device", "cache_dir", "checkpoint_every", "log_every", "merge"):
            d.pop(k)
        return d


def build_finetune_config(config_file: str | None, overrides: dict) -> FinetuneConfig:
    """Defaults, then a YAML preset (`finetune-NAME.yaml` under configs/, or a path), then CLI flags."""
    values: dict = {}
    if config_file:
        try:
            path = find_config(f"finetune-{config_file}")
        except BonsaiError:
            path = find_config(config_file)
        try:
            values = {k.replace("-", "_"): v for k, v in (yaml.safe_load(path.read_text()) or {}).items()}
        except yaml.YAMLError as exc:
            raise BonsaiError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
        unknown = sorted(set(values) - {f.name for f in fields(FinetuneConfig)})
        if unknown:
            raise BonsaiError(f"{path}: unknown keys {', '.join(unknown)} (finetune presets live in {CONFIG_DIR})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return FinetuneConfig(**values).validate()
