"""OLMo-2: LLaMA-named blocks with norms after attention and MLP, and q/k RMSNorm over the whole projection.

That q/k norm takes one RMS over all heads together (transformers' Olmo2Attention normalises q_proj's full
output before splitting heads), so removing a head changes the scale of every other head: no slicing of
heads is exact. Attention units are therefore refused; MLP channels prune exactly (`--units mlp`).
"""

from __future__ import annotations

from bonsai.adapters.base import ATTENTION
from bonsai.adapters.llama import LlamaAdapter
from bonsai.adapters.registry import register_adapter


@register_adapter
class Olmo2Adapter(LlamaAdapter):
    model_types = ("olmo2",)
    causal_lm_class = "Olmo2ForCausalLM"
    unprunable = {ATTENTION: "OLMo-2 normalises q and k over all heads together (q_norm/k_norm span the whole "
                             "projection), so removing a head would change the others; prune MLP channels only "
                             "with --units mlp"}

    def residual_scale(self, layer: int) -> float | None:
        return None  # post_attention_layernorm / post_feedforward_layernorm act on the projections' outputs
