"""What every GGUF layout writes through: the tensor sink (each tensor in the requested type, its type
recorded), the rotary permutation, and the keys and embeddings all of llama.cpp's architectures share."""

from __future__ import annotations

import numpy as np
import torch

from bonsai.adapters.base import ArchAdapter
from bonsai.errors import BonsaiError

ZERO_MLP_WIDTH = 32  # channels of the all-zero MLP of a layer that lost every channel (a q8_0 block)


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise BonsaiError("GGUF export needs the gguf package: pip install 'bonsai-prune[export]' (or pip install gguf)"
                          ) from None
    return gguf


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float32).cpu().numpy()


def rotary_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half layout (pairs i, i + d/2 in each head) -> llama.cpp's adjacent pairs (2i, 2i+1),
    for a q/k weight (heads x head_dim, in) or bias (heads x head_dim,)."""
    if n_head == 0:
        return w
    shape = w.shape
    head_dim = shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


class TensorSink:
    """Adds tensors to a GGUFWriter in the requested type (2-D weights) or float32 (norms, biases),
    recording the type each tensor got."""

    def __init__(self, writer, dtype: str):
        self.gguf = _require_gguf()
        self.writer, self.dtype = writer, dtype
        self.types: dict[str, str] = {}
        self.params = 0

    def add(self, name: str, value: np.ndarray) -> None:
        gguf = self.gguf
        value = np.ascontiguousarray(value, dtype=np.float32)
        self.params += value.size
        if value.ndim < 2 or self.dtype == "f32":
            self.writer.add_tensor(name, value)
            self.types[name] = "f32"
            return
        kind = self.dtype
        if kind == "q8_0" and value.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]:
            kind = "f16"  # a row length q8_0 cannot block: llama.cpp's own converter falls back the same way
        if kind == "f16":
            self.writer.add_tensor(name, value.astype(np.float16))
        else:
            qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
            self.writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        self.types[name] = kind


def _rope_keys(writer, config, head_dim: int, sink: TensorSink) -> None:
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return
    if kind == "linear":
        writer.add_rope_scaling_type(sink.gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
        return
    if kind == "llama3":
        # LLaMA-3.x: per-frequency factors, written as llama.cpp's rope_freqs tensor (one factor per pair)
        base = float(params.get("rope_theta", 10000.0))
        freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        factors = []
        for f in freqs:
            wavelen = 2 * np.pi / f
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        sink.add("rope_freqs.weight", np.asarray(factors, dtype=np.float32))
        return
    raise BonsaiError(f"rope scaling {kind!r} has no GGUF form in bonsai's exporter yet (supported: default, linear, llama3)")


def add_shape_keys(writer, config, n_layer: int, n_ff, n_head, n_head_kv, head_dim: int, rotary: int) -> None:
    """The hyperparameters every RMSNorm layout writes (counts may be per-layer lists, for `deci`)."""
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(rotary)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def add_embeddings(model, sink: TensorSink, norm: np.ndarray | None = None, output: bool | None = None) -> None:
    """token_embd, output_norm and (unless tied) output. `norm`: the final norm as written (default: its weight);
    `output`: force writing the output layer (True) or follow the tying (None)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    sink.add("token_embd.weight", _np(inp.weight))
    sink.add("output_norm.weight", _np(model.model.norm.weight) if norm is None else norm)
    tied = getattr(model.config, "tie_word_embeddings", False) and out.weight.data_ptr() == inp.weight.data_ptr()
    if output or (output is None and not tied):
        sink.add("output.weight", _np(out.weight))


def uniform_sizes(adapter: ArchAdapter, model_type: str) -> tuple[int, int]:
    """(attention units, MLP channels) shared by every layer, or a one-line refusal."""
    sizes = {(adapter.attention(i).units, adapter.mlp(i).units) for i in range(adapter.num_layers)}
    if len(sizes) != 1:
        counts = sorted(sizes)[:4]
        raise BonsaiError(f"llama.cpp's {model_type} builds every layer with the same sizes, and this model's layers "
                          f"differ ((attention units, MLP channels): {counts}{' ...' if len(sizes) > 4 else ''}); "
                          "prune with --allocation uniform to export it")
    units, channels = sizes.pop()
    if units == 0 or channels == 0:
        raise BonsaiError(f"llama.cpp's {model_type} needs attention and an MLP in every layer; this model has "
                          f"{units} attention units and {channels} MLP channels per layer")
    return units, channels
