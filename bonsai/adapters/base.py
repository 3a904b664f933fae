"""The small interface between the pruning algorithm and one architecture family.

All architecture knowledge (module names, how attention heads map onto projection rows, which
attributes the attention code reads) lives in subclasses of `ArchAdapter`. The algorithm only sees
*unit groups*: per layer, the attention units and the MLP channels, each unit with a parameter count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bonsai.models.plan import EMPTY_ATTENTION_ATTR, empty_attention_forward

ATTENTION = "attention"
MLP = "mlp"
KINDS = (ATTENTION, MLP)


@dataclass
class AttentionSpec:
    """Where one layer's attention lives. A unit is one key/value head with its query heads."""

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    out_name: str
    head_dim: int
    queries_per_kv: int

    @property
    def units(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def unit_width(self) -> int:
        """Columns of the output projection's input that belong to one unit."""
        return self.queries_per_kv * self.head_dim


@dataclass
class MlpSpec:
    """Where one layer's MLP lives. A unit is one intermediate channel."""

    module: nn.Module
    inputs: list[nn.Linear]
    out: nn.Linear

    @property
    def units(self) -> int:
        return self.out.in_features

    unit_width: int = 1


@dataclass(frozen=True)
class GroupKey:
    layer: int
    kind: str

    def __str__(self) -> str:
        return f"{self.layer}.{self.kind}"

    @classmethod
    def parse(cls, text: str) -> GroupKey:
        layer, kind = text.split(".", 1)
        return cls(int(layer), kind)


def _linear_params(lin: nn.Linear, rows: bool) -> int:
    """Parameters of one output row (rows=True, bias included) or one input column of `lin`."""
    if rows:
        return lin.in_features + (1 if lin.bias is not None else 0)
    return lin.out_features


def _slice_linear(lin: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only `index` along `dim` of the weight (0: output rows with bias, 1: input columns)."""
    index = index.to(lin.weight.device)
    with torch.no_grad():
        weight = lin.weight.index_select(dim, index).clone()
        lin.weight = nn.Parameter(weight, requires_grad=lin.weight.requires_grad)
        if dim == 0:
            if lin.bias is not None:
                lin.bias = nn.Parameter(lin.bias.index_select(0, index).clone(), requires_grad=lin.bias.requires_grad)
            lin.out_features = weight.shape[0]
        else:
            lin.in_features = weight.shape[1]


class ArchAdapter(ABC):
    """One architecture family. Subclasses name the modules; the generic parts are implemented here."""

    model_types: ClassVar[tuple[str, ...]] = ()
    #: class name in `transformers` of the causal LM this family loads as
    causal_lm_class: ClassVar[str] = ""
    #: linear modules of a block, for LoRA
    linear_names: ClassVar[tuple[str, ...]] = ()
    #: attention and MLP both read the block input (Phi), instead of the MLP reading the attention's output
    parallel_block: ClassVar[bool] = False
    #: unit kinds that cannot be removed exactly in this family, with the reason (refused in one line)
    unprunable: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module):
        self.model = model

    # ---- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The decoder blocks."""

    @abstractmethod
    def attention(self, layer: int) -> AttentionSpec:
        ...

    @abstractmethod
    def mlp(self, layer: int) -> MlpSpec:
        ...

    def attention_attributes(self, spec: AttentionSpec) -> dict[str, int]:
        """Per-module attributes the attention code reads, to be kept in step with the slicing."""
        attrs = {"num_key_value_groups": spec.queries_per_kv, "head_dim": spec.head_dim}
        units = spec.units
        for name, value in (("num_heads", units * spec.queries_per_kv), ("num_key_value_heads", units)):
            if hasattr(spec.module, name):
                attrs[name] = value
        return attrs

    # ---- generic, built on the above ---------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def groups(self, kinds: tuple[str, ...] = KINDS) -> list[GroupKey]:
        """The unit groups of `kinds` this family can prune exactly (see `check_kinds` for the refusal)."""
        return [GroupKey(i, k) for i in range(self.num_layers) for k in KINDS if k in kinds and k not in self.unprunable]

    def check_kinds(self, kinds: tuple[str, ...]) -> None:
        """Refuse, in one line, a request to prune units this family cannot remove exactly."""
        from bonsai.errors import BonsaiError

        for kind in kinds:
            if kind in self.unprunable:
                raise BonsaiError(self.unprunable[kind])

    def spec(self, key: GroupKey) -> AttentionSpec | MlpSpec:
        return self.attention(key.layer) if key.kind == ATTENTION else self.mlp(key.layer)

    def group_size(self, key: GroupKey) -> int:
        return self.spec(key).units

    def params_per_unit(self, key: GroupKey) -> int:
        """Exact parameters one unit carries, biases included."""
        s = self.spec(key)
        if isinstance(s, AttentionSpec):
            q_rows = s.queries_per_kv * s.head_dim
            return (
                q_rows * _linear_params(s.q, rows=True)
                + s.head_dim * (_linear_params(s.k, rows=True) + _linear_params(s.v, rows=True))
                + q_rows * _linear_params(s.out, rows=False)
            )
        return sum(_linear_params(lin, rows=True) for lin in s.inputs) + _linear_params(s.out, rows=False)

    def unit_weights(self, key: GroupKey) -> list[tuple[torch.Tensor, int, int]]:
        """(weight, dim, width) triples: along `dim`, each unit owns `width` consecutive slices."""
        s = self.spec(key)
        if isinstance(s, AttentionSpec):
            return [
                (s.q.weight, 0, s.unit_width),
                (s.k.weight, 0, s.head_dim),
                (s.v.weight, 0, s.head_dim),
                (s.out.weight, 1, s.unit_width),
            ]
        return [(lin.weight, 0, 1) for lin in s.inputs] + [(s.out.weight, 1, 1)]

    def block_parameters(self) -> int:
        """Parameters inside the decoder blocks (embeddings and the LM head excluded)."""
        return sum(p.numel() for p in self.layers().parameters())

    def output_projection(self, key: GroupKey) -> nn.Linear:
        """The linear whose input columns carry each unit's contribution (hook point for masks)."""
        return self.spec(key).out

    def unit_width(self, key: GroupKey) -> int:
        return self.spec(key).unit_width

    def stock_config(self, attention_units: int, mlp_units: int) -> dict:
        """Config fields of the family for a model whose every layer has these sizes: saved this way, it loads
        in stock transformers (and every engine) without bonsai's plan."""
        att = self.attention(0)
        return {"num_attention_heads": attention_units * att.queries_per_kv, "num_key_value_heads": attention_units,
                "head_dim": att.head_dim, "intermediate_size": mlp_units}

    def add_output_bias(self, key: GroupKey) -> None:
        """Give the group's output projection a zero bias (reconstruction may need one the family lacks);
        the saved plan records it so the checkpoint reloads with the same shapes."""
        lin = self.output_projection(key)
        if lin.bias is None:
            w = lin.weight
            lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                    requires_grad=w.requires_grad)

    def slice(self, key: GroupKey, keep: torch.Tensor) -> None:
        """Physically remove every unit of the group that is not in `keep` (sorted unit indices)."""
        keep = torch.as_tensor(keep, dtype=torch.long).sort().values
        s = self.spec(key)
        if isinstance(s, AttentionSpec):
            q_index = _expand(keep, s.unit_width)
            kv_index = _expand(keep, s.head_dim)
            _slice_linear(s.q, q_index, 0)
            _slice_linear(s.k, kv_index, 0)
            _slice_linear(s.v, kv_index, 0)
            _slice_linear(s.out, q_index, 1)
            for name, value in self.attention_attributes(s).items():
                setattr(s.module, name, value)
            if len(keep) == 0:
                setattr(s.module, EMPTY_ATTENTION_ATTR, s.out_name)
                s.module.forward = empty_attention_forward.__get__(s.module)
        else:
            for lin in s.inputs:
                _slice_linear(lin, keep, 0)
            _slice_linear(s.out, keep, 1)


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices -> the `width` consecutive row/column indices each one owns."""
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
