"""The small interface between the pruning algorithm and one architecture family.

All architecture knowledge (module names, how attention heads map onto projection rows, which
attributes the attention code reads) lives in subclasses of `ArchAdapter`. The algorithm only sees
*unit groups*: per layer, the attention units and the MLP channels, each unit with a parameter count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from bonsai.adapters.plan import EMPTY_ATTENTION_ATTR, empty_attention_forward, set_module_attribute

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
    #: fused q/k/v in one linear (Phi-3): where the k and v rows start, and the units (not readable off k's rows)
    k_start: int = 0
    v_start: int = 0
    kv_units: int | None = None

    @property
    def fused(self) -> bool:
        return self.q is self.k

    @property
    def units(self) -> int:
        return self.kv_units if self.kv_units is not None else self.k.out_features // self.head_dim

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
    #: equal row segments per input linear, one row of each per channel (Phi-3's fused gate_up_proj: 2)
    segments: int = 1

    @property
    def units(self) -> int:
        return self.out.in_features

    unit_width: int = 1


class UnitSlice(NamedTuple):
    """Part of a weight that a group's units own: along `dim`, from `start`, `length` slices, each unit
    `width` consecutive ones (a fused weight holds several such parts)."""
    weight: torch.Tensor
    dim: int
    width: int
    start: int
    length: int

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """The same part of `t` (the weight itself, or a tensor of its shape such as its gradient)."""
        return t.narrow(self.dim, self.start, self.length)


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

    def head_logits(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Next-token logits of the vocabulary entries start..stop-1 from final hidden states (after the final norm),
        exactly as the model's own forward computes them after its decoder: the head, then whatever the family does
        to its output, entry by entry (soft-capping, scaling). Lets a loss over a large vocabulary be taken a slice
        of it at a time (`bonsai.engine.logits`)."""
        head = self.model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        return torch.nn.functional.linear(hidden, head.weight[start:stop], None if bias is None else bias[start:stop])

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
        return s.segments * sum(_linear_params(lin, rows=True) for lin in s.inputs) + _linear_params(s.out, rows=False)

    def unit_weights(self, key: GroupKey) -> list[UnitSlice]:
        """Every part of a weight the group's units own (priors and LLM-Pruner's gradient scores read them)."""
        s = self.spec(key)
        n = s.units
        if isinstance(s, AttentionSpec):
            return [
                UnitSlice(s.q.weight, 0, s.unit_width, 0, n * s.unit_width),
                UnitSlice(s.k.weight, 0, s.head_dim, s.k_start, n * s.head_dim),
                UnitSlice(s.v.weight, 0, s.head_dim, s.v_start, n * s.head_dim),
                UnitSlice(s.out.weight, 1, s.unit_width, 0, n * s.unit_width),
            ]
        return ([UnitSlice(lin.weight, 0, 1, j * n, n) for lin in s.inputs for j in range(s.segments)]
                + [UnitSlice(s.out.weight, 1, 1, 0, n)])

    def block_parameters(self) -> int:
        """Parameters inside the decoder blocks (embeddings and the LM head excluded)."""
        return sum(p.numel() for p in self.layers().parameters())

    def output_projection(self, key: GroupKey) -> nn.Linear:
        """The linear whose input columns carry each unit's contribution (hook point for masks)."""
        return self.spec(key).out

    def unit_width(self, key: GroupKey) -> int:
        return self.spec(key).unit_width

    def residual_scale(self, layer: int) -> float | None:
        """The factor by which an output projection's output enters the residual stream (the residual-target refit
        fits it); None where a norm sits between them (Gemma-2/3, OLMo-2: post-sub-layer norms)."""
        return 1.0

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
            if s.fused:  # one linear: its q, k and v row blocks shrink together
                _slice_linear(s.q, torch.cat([q_index, s.k_start + kv_index, s.v_start + kv_index]), 0)
            else:
                _slice_linear(s.q, q_index, 0)
                _slice_linear(s.k, kv_index, 0)
                _slice_linear(s.v, kv_index, 0)
            _slice_linear(s.out, q_index, 1)
            s.kv_units = len(keep) if s.kv_units is not None else None
            for name, value in self.attention_attributes(s).items():
                set_module_attribute(s.module, name, value)
            if len(keep) == 0:
                setattr(s.module, EMPTY_ATTENTION_ATTR, s.out_name)
                s.module.forward = empty_attention_forward.__get__(s.module)
        else:
            n = s.units
            rows = torch.cat([j * n + keep for j in range(s.segments)])
            for lin in s.inputs:
                _slice_linear(lin, rows, 0)
            _slice_linear(s.out, keep, 1)


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices -> the `width` consecutive row/column indices each one owns."""
    return (units[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
