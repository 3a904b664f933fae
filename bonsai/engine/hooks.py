"""Forward pre-hooks owned by one object and removed together.

Statistics (Gram matrices, activation norms) and virtual sub-models (unit masks) all read or rewrite the
input of some linears. A pass that fails half way must not leave hooks on the model, so every such object
is a context manager that removes what it registered.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import partial
from typing import Any

from torch import nn


class PreHooks:
    """One forward pre-hook per module, calling `self._hook(key, module, args)`; `remove()` or `with` drops them."""

    def __init__(self, modules: Mapping[Hashable, nn.Module]):
        self._handles = [m.register_forward_pre_hook(partial(self._hook, key)) for key, m in modules.items()]

    def _hook(self, key: Any, module: nn.Module, args: tuple) -> Any:
        raise NotImplementedError

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
