"""Replaying a pruning plan onto a freshly built model, so pruned checkpoints load like stock ones.

This file is self-contained on purpose (torch and transformers only): `save_pruned` copies it into
every pruned checkpoint as `modeling_bonsai.py`, so that stock `AutoModelForCausalLM.from_pretrained(
dir, trust_remote_code=True)` can rebuild the smaller shapes before the weights are read. bonsai's own
loader uses the same functions without remote code.

A plan (stored in `config.json` under `bonsai_plan`) holds, per decoder block, the kept unit counts,
the shape of every linear module, the attention attributes the forward reads, and which attention
modules lost every unit (they then only add their output bias to the residual stream).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PLAN_KEY = "bonsai_plan"
PLAN_VERSION = 2  # 2: `linear_bias` (biases added by reconstruction); plans without it are version 1
EMPTY_ATTENTION_ATTR = "_bonsai_empty_out_proj"


def empty_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                            past_key_values=None, **kwargs):
    """Forward of an attention module with no heads left: contributes only its output bias.

    The (empty) key/value cache is still updated so that cache lengths stay right in `generate()`.
    """
    out_proj = getattr(self, getattr(self, EMPTY_ATTENTION_ATTR))
    if past_key_values is not None:
        empty = hidden_states.new_zeros(*hidden_states.shape[:-2], 0, hidden_states.shape[-2], self.head_dim)
        past_key_values.update(empty, empty, self.layer_idx)
    return out_proj(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


def _resize_linear(lin: nn.Linear, in_features: int, out_features: int, bias: bool | None = None) -> None:
    if bias and lin.bias is None:  # a bias the family does not have, added by reconstruction
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype))
    if (lin.in_features, lin.out_features) == (in_features, out_features):
        return
    device, dtype = lin.weight.device, lin.weight.dtype
    lin.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
    if lin.bias is not None:
        lin.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
    lin.in_features, lin.out_features = in_features, out_features


PRIVATE_CONFIG_ATTR = "_bonsai_private_config"


def set_module_attribute(module: nn.Module, name: str, value) -> None:
    """`setattr`, where "config.X" sets X on a per-module copy of the shared config (Phi-3's attention reads
    its head count from `self.config`, which all layers share)."""
    if name.startswith("config."):
        if not getattr(module, PRIVATE_CONFIG_ATTR, False):
            module.config = copy.copy(module.config)
            setattr(module, PRIVATE_CONFIG_ATTR, True)
        setattr(module.config, name[len("config."):], value)
    else:
        setattr(module, name, value)


def apply_plan(model: nn.Module, plan: dict) -> None:
    """Give `model` (built from the parent's config) the shapes and attributes recorded in `plan`."""
    if int(plan.get("version", 0)) > PLAN_VERSION:
        raise ValueError(f"pruning plan version {plan.get('version')} is newer than this code supports")
    biases = set(plan.get("linear_bias", []))
    for path, (in_features, out_features) in plan.get("linear_shapes", {}).items():
        _resize_linear(model.get_submodule(path), int(in_features), int(out_features), path in biases)
    for path, attrs in plan.get("attributes", {}).items():
        module = model.get_submodule(path)
        for name, value in attrs.items():
            set_module_attribute(module, name, value)
    for path, out_name in plan.get("empty_attention", {}).items():
        module = model.get_submodule(path)
        setattr(module, EMPTY_ATTENTION_ATTR, out_name)
        module.forward = empty_attention_forward.__get__(module)
