"""Architecture adapters; importing this package registers every family."""

from bonsai.adapters import gemma, granite, llama, mistral, olmo2, phi, phi3, qwen2, qwen3  # noqa: F401  (registration side effects)
from bonsai.adapters.base import ATTENTION, KINDS, MLP, ArchAdapter, GroupKey
from bonsai.adapters.registry import adapter_class, get_adapter, register_adapter, supported_model_types

__all__ = [
    "ATTENTION", "KINDS", "MLP", "ArchAdapter", "GroupKey",
    "adapter_class", "get_adapter", "register_adapter", "supported_model_types",
]
