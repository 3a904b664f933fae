"""Phi-3 / Phi-3.5 (and Phi-4-mini): LLaMA-like blocks with a fused `qkv_proj` and a fused `gate_up_proj`.

A unit (a key/value head with its query heads) owns row blocks in three places of `qkv_proj` (q rows from
0, k rows after all q rows, v rows after all k rows), and an MLP channel owns one row in each half of
`gate_up_proj` (the forward splits it with `chunk(2)`). Phi3Attention splits q from k by
`self.config.num_attention_heads`, a config all layers share, so a sliced layer gets its own copy of the
config with its head count (recorded in the plan as the attribute `config.num_attention_heads`).
LongRoPE scaling lives in the model's rotary embedding, which slicing does not touch.
"""

from __future__ import annotations

from torch import nn

from bonsai.adapters.base import ArchAdapter, AttentionSpec, MlpSpec
from bonsai.adapters.registry import register_adapter


@register_adapter
class Phi3Adapter(ArchAdapter):
    model_types = ("phi3",)
    causal_lm_class = "Phi3ForCausalLM"
    linear_names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention(self, layer: int) -> AttentionSpec:
        attn = self.layers()[layer].self_attn
        kv = attn.num_key_value_heads
        q_rows = kv * attn.num_key_value_groups * attn.head_dim
        return AttentionSpec(
            module=attn, q=attn.qkv_proj, k=attn.qkv_proj, v=attn.qkv_proj, out=attn.o_proj, out_name="o_proj",
            head_dim=attn.head_dim, queries_per_kv=attn.num_key_value_groups,
            k_start=q_rows, v_start=q_rows + kv * attn.head_dim, kv_units=kv,
        )

    def mlp(self, layer: int) -> MlpSpec:
        mlp = self.layers()[layer].mlp
        return MlpSpec(module=mlp, inputs=[mlp.gate_up_proj], out=mlp.down_proj, segments=2)

    def attention_attributes(self, spec: AttentionSpec) -> dict[str, int]:
        attrs = super().attention_attributes(spec)
        attrs["num_key_value_heads"] = spec.units
        attrs["config.num_attention_heads"] = spec.units * spec.queries_per_kv
        attrs["config.num_key_value_heads"] = spec.units
        return attrs
