"""Saving pruned models as ordinary Hugging Face checkpoints (safetensors, atomic)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from bonsai.adapters import get_adapter
from bonsai.adapters import plan as plan_module
from bonsai.adapters.base import ArchAdapter
from bonsai.adapters.plan import EMPTY_ATTENTION_ATTR, PLAN_KEY, PLAN_VERSION
from bonsai.errors import BonsaiError
from bonsai.io import disk_errors

MODELING_FILE = "modeling_bonsai.py"


def record_plan(adapter: ArchAdapter) -> dict:
    """Describe the current (possibly pruned) block shapes so a fresh model can be rebuilt to match."""
    layers, shapes, attributes, empty, biases = [], {}, {}, {}, []
    prefix = {id(m): n for n, m in adapter.model.named_modules()}
    fresh = _fresh_bias_layout(adapter)
    for i in range(adapter.num_layers):
        att, mlp = adapter.attention(i), adapter.mlp(i)
        layers.append({"attention_units": att.units, "mlp_units": mlp.units})
        for lin in [att.q, att.k, att.v, att.out, *mlp.inputs, mlp.out]:
            shapes[prefix[id(lin)]] = [lin.in_features, lin.out_features]
            if lin.bias is not None and not fresh.get(prefix[id(lin)], False):
                biases.append(prefix[id(lin)])
        attributes[prefix[id(att.module)]] = adapter.attention_attributes(att)
        if hasattr(att.module, EMPTY_ATTENTION_ATTR):
            empty[prefix[id(att.module)]] = getattr(att.module, EMPTY_ATTENTION_ATTR)
    plan = {
        "version": PLAN_VERSION if biases else 1,
        "layers": layers,
        "linear_shapes": shapes,
        "attributes": attributes,
        "empty_attention": empty,
    }
    if biases:
        plan["linear_bias"] = biases
    return plan


def uniform_sizes(adapter: ArchAdapter) -> tuple[int, int] | None:
    """(attention units, MLP units) when every layer has them, none is empty and no bias was added; else None."""
    sizes = {(adapter.attention(i).units, adapter.mlp(i).units) for i in range(adapter.num_layers)}
    if len(sizes) != 1:
        return None
    att, mlp = next(iter(sizes))
    if att == 0 or mlp == 0 or "linear_bias" in record_plan(adapter):
        return None
    return att, mlp


def _stock_config(adapter: ArchAdapter) -> dict | None:
    """The family's config fields for a uniform model, if its config class accepts them (transformers' LLaMA
    config, for one, refuses a head count that does not divide the hidden size, even with an explicit head_dim:
    such a model keeps bonsai's plan)."""
    import copy

    sizes = uniform_sizes(adapter)
    if sizes is None:
        return None
    fields = adapter.stock_config(*sizes)
    candidate = copy.deepcopy(adapter.model.config)
    for name, value in fields.items():
        setattr(candidate, name, value)
    try:
        if hasattr(candidate, "validate"):
            candidate.validate()
    except Exception:  # the family's own validation: keep the plan, which loads the same weights
        return None
    return fields


def _fresh_bias_layout(adapter: ArchAdapter) -> dict[str, bool]:
    """Which block linears have a bias in a model built from the config alone (no weights, meta device)."""
    import transformers

    config = adapter.model.config
    with torch.device("meta"):
        fresh = getattr(transformers, adapter.causal_lm_class)(config)
    return {n: m.bias is not None for n, m in fresh.named_modules() if isinstance(m, nn.Linear)}


def modeling_source(causal_lm_class: str) -> str:
    """The self-contained modeling file placed in every pruned checkpoint (for trust_remote_code users)."""
    source = Path(plan_module.__file__).read_text()
    return (
        source
        + f"\n\nfrom transformers import {causal_lm_class} as _BonsaiBase  # noqa: E402\n\n\n"
        "class BonsaiForCausalLM(_BonsaiBase):\n"
        '    """The parent architecture with the pruned shapes of `config.bonsai_plan`."""\n\n'
        "    def __init__(self, config, *args, **kwargs):\n"
        "        super().__init__(config, *args, **kwargs)\n"
        f"        apply_plan(self, config.{PLAN_KEY})\n"
    )


def atomic_replace(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place; an old folder is removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, overwrite: bool = True,
                extra_files: dict[str, Path] | None = None, structured: bool = True) -> Path:
    """Write safetensors weights, a config with the pruning plan, tokenizer files and the modeling file.

    `structured=False` (weights zeroed in place, shapes unchanged) writes a plain checkpoint that loads
    anywhere, unless the model already carries a plan from an earlier structured pruning.
    Everything goes to a temporary sibling folder first, renamed into place when complete, so an
    interrupted save never leaves a half-written model at `out_dir`.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BonsaiError(f"output folder {out} already exists")
    adapter = get_adapter(model)
    config = model.config
    plan = structured or getattr(config, PLAN_KEY, None) is not None
    stock = _stock_config(adapter) if plan else None
    if stock is not None:  # the same sizes in every layer: the family's own config says it all
        for name, value in stock.items():
            setattr(config, name, value)
        for attr in (PLAN_KEY, "auto_map"):
            if hasattr(config, attr):
                delattr(config, attr)
        plan = False
    if plan:
        setattr(config, PLAN_KEY, record_plan(adapter))
        config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.BonsaiForCausalLM"}
    config.architectures = [adapter.causal_lm_class]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with disk_errors(out):
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if plan:
                (tmp / MODELING_FILE).write_text(modeling_source(adapter.causal_lm_class))
            for name, src in (extra_files or {}).items():
                src = Path(src)
                if src.is_dir():
                    shutil.copytree(src, tmp / name)
                elif src.exists():
                    shutil.copy2(src, tmp / name)
            atomic_replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
