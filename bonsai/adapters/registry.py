"""Adapters registered by `config.model_type`."""

from __future__ import annotations

from torch import nn

from bonsai.adapters.base import ArchAdapter
from bonsai.errors import BonsaiError

_ADAPTERS: dict[str, type[ArchAdapter]] = {}


def register_adapter(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Class decorator: make `cls` the adapter for each of its `model_types`."""
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_class(model_type: str) -> type[ArchAdapter]:
    if model_type not in _ADAPTERS:
        raise BonsaiError(
            f"unsupported architecture {model_type!r}; supported families: {', '.join(supported_model_types())}"
        )
    return _ADAPTERS[model_type]


def get_adapter(model: nn.Module) -> ArchAdapter:
    return adapter_class(model.config.model_type)(model)

