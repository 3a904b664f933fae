"""Gemma 1/2/3 (text): LLaMA-named blocks with a GeGLU MLP (gate/up/down), an explicit head_dim, RMSNorm
with the +1 offset, and tied embeddings.

Nothing of it mixes heads or channels: Gemma-2/3's logit soft-capping and query scaling
(`query_pre_attn_scalar`) are per score, the norms after attention and MLP act on the projections' outputs
(the reconstruction target stays the output projection's output), sliding-window layers need no slicing,
and Gemma-3's q/k norms are per head with shared weights, as in Qwen3.
"""

from __future__ import annotations

import torch

from bonsai.adapters.llama import LlamaAdapter
from bonsai.adapters.registry import register_adapter


def _soft_capped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-2/3's final logit soft-capping, cap * tanh(logits / cap), when the config sets a cap."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


@register_adapter
class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma",)
    causal_lm_class = "GemmaForCausalLM"


@register_adapter
class Gemma2Adapter(LlamaAdapter):
    model_types = ("gemma2",)
    causal_lm_class = "Gemma2ForCausalLM"

    def head_logits(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return _soft_capped(super().head_logits(hidden, start, stop), self.model.config.final_logit_softcapping)

    def residual_scale(self, layer: int) -> float | None:
        return None  # the norms after attention and MLP act on the projections' outputs


@register_adapter
class Gemma3TextAdapter(LlamaAdapter):
    model_types = ("gemma3_text",)
    causal_lm_class = "Gemma3ForCausalLM"

    def head_logits(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return _soft_capped(super().head_logits(hidden, start, stop),
                            getattr(self.model.config, "final_logit_softcapping", None))

    def residual_scale(self, layer: int) -> float | None:
        return None  # the norms after attention and MLP act on the projections' outputs
