"""Every preset under bonsai/configs/ loads and validates; the 7B-class presets ask for serving shapes."""

from pathlib import Path

import pytest

from bonsai.presets import CONFIG_DIR
from bonsai.methods.settings import build_config

pytestmark = pytest.mark.unit

PRESETS = sorted(p.stem for p in Path(CONFIG_DIR).glob("*.yaml") if not p.stem.startswith("finetune"))
# MLP widths of the parents (their configs), which a width multiple must divide so the parent is a valid start
PARENT_MLP = {"llama-2-7b": 11008, "llama-7b": 11008, "mistral-7b": 14336, "llama-3.1-8b": 14336, "qwen3-8b": 12288,
              "gemma-2-9b": 14336, "granite-3-8b": 12800, "olmo-2-7b": 11008, "phi-3-mini": 8192, "phi-2": 10240}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_a_valid_config(name):
    cfg = build_config(name, {})
    assert 0 < cfg.sparsity < 1


@pytest.mark.parametrize("name", sorted(PARENT_MLP))
def test_serving_presets_keep_widths_that_k_quants_block(name):
    cfg = build_config(name, {})
    assert cfg.width_multiple == 256 and PARENT_MLP[name] % cfg.width_multiple == 0


def test_paper_presets_keep_the_papers_shapes():
    for name in (n for n in PRESETS if n.startswith("paper-")):
        cfg = build_config(name, {})
        assert cfg.width_multiple == 1 and cfg.allocation == "global"
