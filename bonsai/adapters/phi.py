"""Phi-2: parallel attention and MLP, LayerNorm, partial rotary, biases on every linear.

Partial rotary and the optional q/k LayerNorm act within a head, so whole-head slicing leaves them alone.
"""

from __future__ import annotations

from torch import nn

from bonsai.adapters.base import ArchAdapter, AttentionSpec, MlpSpec
from bonsai.adapters.registry import register_adapter


@register_adapter
class PhiAdapter(ArchAdapter):
    model_types = ("phi",)
    causal_lm_class = "PhiForCausalLM"
    linear_names = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
    parallel_block = True

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def attention(self, layer: int) -> AttentionSpec:
        attn = self.layers()[layer].self_attn
        return AttentionSpec(
            module=attn, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, out=attn.dense, out_name="dense",
            head_dim=attn.head_dim, queries_per_kv=attn.num_key_value_groups,
        )

    def mlp(self, layer: int) -> MlpSpec:
        mlp = self.layers()[layer].mlp
        return MlpSpec(module=mlp, inputs=[mlp.fc1], out=mlp.fc2)
