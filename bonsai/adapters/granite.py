"""Granite 3.x: LLaMA blocks with embedding, residual, attention and logits multipliers.

The multipliers are scalars from the config (attention's is its score scaling), applied outside the
projections, so slicing units and refitting output projections are unchanged.
"""

from __future__ import annotations

import torch

from bonsai.adapters.llama import LlamaAdapter
from bonsai.adapters.registry import register_adapter


@register_adapter
class GraniteAdapter(LlamaAdapter):
    model_types = ("granite",)
    causal_lm_class = "GraniteForCausalLM"

    def head_logits(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return super().head_logits(hidden, start, stop) / self.model.config.logits_scaling

    def residual_scale(self, layer: int) -> float | None:
        return float(self.model.config.residual_multiplier)
