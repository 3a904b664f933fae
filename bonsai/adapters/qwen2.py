"""Qwen2: LLaMA blocks with grouped-query attention and q/k/v biases (sliced with their rows)."""

from __future__ import annotations

from bonsai.adapters.llama import LlamaAdapter
from bonsai.adapters.registry import register_adapter


@register_adapter
class Qwen2Adapter(LlamaAdapter):
    model_types = ("qwen2",)
    causal_lm_class = "Qwen2ForCausalLM"
