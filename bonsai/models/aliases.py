"""Short names for the paper's models, the common 2024-25 checkpoints of the supported families, and the shipped
tiny model."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"

MODEL_ALIASES: dict[str, str] = {
    "tiny": str(TINY_MODEL_DIR),
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-7b": "huggyllama/llama-7b",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "phi-2": "microsoft/phi-2",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "gemma-7b": "google/gemma-7b",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-3-1b": "google/gemma-3-1b-pt",  # text-only (gemma3_text); the larger Gemma-3 are multimodal
    "granite-3-8b": "ibm-granite/granite-3.0-8b-base",
    "olmo-2-7b": "allenai/OLMo-2-1124-7B",
    "phi-3-mini": "microsoft/Phi-3-mini-4k-instruct",
}


def resolve_model_name(name: str) -> str:
    return MODEL_ALIASES.get(name, name)
