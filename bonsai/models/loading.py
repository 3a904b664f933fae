"""Loading plain and pruned checkpoints through transformers' own `from_pretrained`.

Pruned checkpoints carry a plan in `config.json`; bonsai rebuilds the smaller shapes itself, so it
never needs `trust_remote_code` (which stays off unless the user asks for it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bonsai.adapters.plan import PLAN_KEY, apply_plan
from bonsai.errors import BonsaiError
from bonsai.io import read_json
from bonsai.models.aliases import resolve_model_name
from bonsai.models.residency import own_mapped_weights
from bonsai.runtime import hub_reachable, resolve_device, resolve_dtype

_PRUNED_CLASSES: dict[type, type] = {}


def pruned_class(base: type) -> type:
    """A subclass of `base` whose constructor applies the checkpoint's pruning plan before loading."""
    if base not in _PRUNED_CLASSES:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            apply_plan(self, getattr(config, PLAN_KEY))

        _PRUNED_CLASSES[base] = type(f"Bonsai{base.__name__}", (base,), {"__init__": __init__})
    return _PRUNED_CLASSES[base]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def locate_model(name: str) -> tuple[str, dict[str, Any]]:
    """Resolve an alias, local folder or hub id; fail at once (one line) when it cannot be had offline."""
    resolved = resolve_model_name(name)
    path = Path(resolved).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise BonsaiError(f"{resolved} is not a model folder (no config.json)")
        _check_json_files(path)
        return str(path), {}
    if not _HUB_ID.match(resolved):
        raise BonsaiError(f"model path not found: {resolved}")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(resolved, local_files_only=True)
        return resolved, {"local_files_only": True}
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise BonsaiError(
            f"model {resolved!r} is not in the local Hugging Face cache and the Hub cannot be reached; "
            "download it elsewhere and pass its folder with --model PATH"
        )
    return resolved, {}


# The small JSON files of a model folder: a truncated one is named before transformers reads it (its own
# errors blame the wrong file, e.g. "no tokenizer" for a damaged config.json).
MODEL_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "model.safetensors.index.json")
REDOWNLOAD = "re-download or re-create the model"


def _check_json_files(path: Path) -> None:
    for name in MODEL_JSON_FILES:
        if (path / name).exists():
            read_json(path / name, hint=REDOWNLOAD)


def load_config(name: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    location, kwargs = locate_model(name)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **kwargs), location, kwargs
    except (OSError, ValueError, KeyError) as exc:
        raise BonsaiError(f"cannot read the model config of {name}: {_first_line(exc)}") from None


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint's weights were saved in, if its config says."""
    value = getattr(config, "dtype", None)
    return getattr(torch, value, None) if isinstance(value, str) else value


def load_model(
    name: str,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a plain or bonsai-pruned causal LM in eval mode.

    `device_map` (e.g. "auto") hands placement to accelerate for models larger than one device;
    otherwise the whole model goes to `device`.
    """
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    config, location, kwargs = load_config(name, trust_remote_code)
    target = resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, target, checkpoint_dtype(config))
    plan = getattr(config, PLAN_KEY, None)
    if plan is not None:
        from bonsai.adapters import adapter_class

        cls = pruned_class(getattr(transformers, adapter_class(config.model_type).causal_lm_class))
    else:
        cls = AutoModelForCausalLM
    load_kwargs: dict[str, Any] = dict(config=config, dtype=torch_dtype, **kwargs)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if plan is None:
        load_kwargs["trust_remote_code"] = trust_remote_code
    try:
        model = cls.from_pretrained(location, **load_kwargs)
    except ValueError as exc:
        raise BonsaiError(f"cannot load {name} as a causal language model: {_first_line(exc)}") from None
    except (OSError, SafetensorError) as exc:
        raise BonsaiError(f"cannot load the weights of {name} ({_first_line(exc)}): {REDOWNLOAD}") from None
    if device_map is None:
        model.to(target)
    own_mapped_weights(model)  # pruning frees what it slices only if the weights are not views of the file
    adapter_dir = Path(location) / ADAPTER_DIR
    if (adapter_dir / "adapter_config.json").exists():
        model = _with_adapter(model, adapter_dir)
    model.eval()
    return model


ADAPTER_DIR = "adapter"  # `bonsai finetune --no-merge` keeps the LoRA adapter here, beside the base weights


def _with_adapter(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Apply an unmerged LoRA adapter saved by `bonsai finetune --no-merge`, merged in memory (same outputs,
    full speed, and the adapters/pruning code sees a plain model)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise BonsaiError(f"{adapter_dir} holds a LoRA adapter; install peft to load it (pip install peft)") from None
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    location, kwargs = locate_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise BonsaiError(f"no usable tokenizer in {name}: {_first_line(exc)}") from None
    if tok is None or isinstance(tok, bool):
        raise BonsaiError(f"no usable tokenizer in {name}")
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
