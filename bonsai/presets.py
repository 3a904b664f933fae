"""Presets shipped with bonsai (`bonsai/configs/*.yaml`): where they live and how a name finds one, for `prune`
and `finetune` alike."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from bonsai.errors import BonsaiError

# presets ship inside the package, so a wheel or a non-editable install finds them (importlib.resources)
CONFIG_DIR = Path(str(resources.files("bonsai") / "configs"))


def find_config(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise BonsaiError(f"config not found: {name} (looked in {CONFIG_DIR})")
