"""Qwen3: LLaMA blocks with per-head RMSNorm on q and k and an explicit head_dim.

`q_norm`/`k_norm` normalise each head over its own head_dim with one weight vector shared by all heads
(transformers' Qwen3Attention), so removing heads leaves them exactly as they are.
"""

from __future__ import annotations

from bonsai.adapters.llama import LlamaAdapter
from bonsai.adapters.registry import register_adapter


@register_adapter
class Qwen3Adapter(LlamaAdapter):
    model_types = ("qwen3",)
    causal_lm_class = "Qwen3ForCausalLM"
