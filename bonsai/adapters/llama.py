"""LLaMA-1/2/3 (multi-head and grouped-query attention)."""

from __future__ import annotations

from torch import nn

from bonsai.adapters.base import ArchAdapter, AttentionSpec, MlpSpec
from bonsai.adapters.registry import register_adapter


@register_adapter
class LlamaAdapter(ArchAdapter):
    model_types = ("llama",)
    causal_lm_class = "LlamaForCausalLM"
    linear_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention(self, layer: int) -> AttentionSpec:
        attn = self.layers()[layer].self_attn
        return AttentionSpec(
            module=attn, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, out=attn.o_proj, out_name="o_proj",
            head_dim=attn.head_dim, queries_per_kv=attn.num_key_value_groups,
        )

    def mlp(self, layer: int) -> MlpSpec:
        mlp = self.layers()[layer].mlp
        return MlpSpec(module=mlp, inputs=[mlp.gate_proj, mlp.up_proj], out=mlp.down_proj)
