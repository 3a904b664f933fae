"""Mistral: LLaMA blocks with grouped-query and sliding-window attention (the window needs no slicing)."""

from __future__ import annotations

from bonsai.adapters.llama import LlamaAdapter
from bonsai.adapters.registry import register_adapter


@register_adapter
class MistralAdapter(LlamaAdapter):
    model_types = ("mistral",)
    causal_lm_class = "MistralForCausalLM"
