"""GGUF for llama.cpp, written in pure Python through the `gguf` package (the `[export]` extra).

Families and the llama.cpp architecture they become:

* LLaMA-1/2/3, Mistral, Qwen2: `llama` when every layer has the same attention and MLP sizes, else `deci`,
  which reads per-layer arrays for `head_count`, `head_count_kv` and `feed_forward_length` and builds each
  layer with its own sizes. Q and K (weights and biases) are permuted to llama.cpp's rotary layout per layer.
* Qwen3, OLMo-2, Granite: their own architectures, which hold one size for every layer, so only a model pruned
  with `--allocation uniform` (or not pruned) is written (`bonsai/export/gguf_native.py`).
* Phi-2: `phi2` builds every layer from one size and needs the full attention width, so a pruned Phi is
  padded back to uniform with zero heads and zero channels (exact: a zero head attends to zero values and a
  zero channel outputs GELU(0) = 0); the report gives the size overhead.

What `deci` cannot state directly is written so that the function stays the same (see the shared notes on
llama.cpp's per-layer support, checked against the vendored source of llama-cpp-python 0.3.36):
* a layer with no attention units passes its input on (head count 0), except layer 0, which must keep a
  head (llama.cpp takes the head size from it), and a layer whose refit left an output bias: both get one
  zero head (zero q/k/v, zero output columns) that carries the bias;
* a layer with attention but no MLP channels gets a small all-zero MLP (with a feed-forward length of 0,
  llama.cpp would drop the attention output), carrying the refit's output bias if there is one;
* a layer with neither, and no bias, is removed.
Everything padded or removed is listed in the report.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bonsai.adapters import get_adapter
from bonsai.adapters.base import ArchAdapter
from bonsai.errors import BonsaiError
from bonsai.io import disk_errors
from bonsai.export import register_writer

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
K_BLOCK = 256  # a K-quant block: rows must be a multiple of this long
LLAMA_LIKE = ("llama", "mistral", "qwen2")
ZERO_MLP_WIDTH = 32  # channels of the all-zero MLP of a layer that lost every channel (a q8_0 block)


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise BonsaiError("GGUF export needs the gguf package: pip install 'bonsai-prune[export]' (or pip install gguf)"
                          ) from None
    return gguf


@dataclass
class Block:
    """One block as written: its source layer and what was padded."""

    source: int
    n_head: int  # query heads
    n_head_kv: int
    n_ff: int
    dummy_head: bool = False  # one zero head (layer 0, or an attention output bias to carry)
    zero_mlp: bool = False  # an all-zero MLP of ZERO_MLP_WIDTH channels
    notes: list[str] = field(default_factory=list)


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


def _layout_llama(adapter: ArchAdapter) -> tuple[list[Block], bool]:
    """Per-layer sizes and padding for the llama/deci writer; True when every layer has the same sizes."""
    blocks = []
    for i in range(adapter.num_layers):
        att, mlp = adapter.attention(i), adapter.mlp(i)
        units, channels = att.units, mlp.units
        o_bias = att.out.bias is not None and bool(att.out.bias.detach().abs().sum() > 0)
        d_bias = mlp.out.bias is not None and bool(mlp.out.bias.detach().abs().sum() > 0)
        b = Block(i, units * att.queries_per_kv, units, channels)
        if units == 0 and (i == 0 or o_bias):
            b.n_head = b.n_head_kv = 1
            b.dummy_head = True
            b.notes.append("no attention units: one zero head" + (" carrying the output bias" if o_bias else
                                                                   " (llama.cpp takes the head size from layer 0)"))
        if channels == 0 and (b.n_head > 0 or d_bias):
            b.n_ff = ZERO_MLP_WIDTH
            b.zero_mlp = True
            b.notes.append(f"no MLP channels: an all-zero MLP of {ZERO_MLP_WIDTH} channels"
                           + (" carrying the output bias" if d_bias else ""))
        if b.n_head == 0 and b.n_ff == 0:
            b.notes.append("no attention and no MLP: layer removed")
            continue
        blocks.append(b)
    if not blocks:
        raise BonsaiError("every layer of this model is empty; there is nothing to export")
    first = blocks[0]
    uniform = all((b.n_head, b.n_head_kv, b.n_ff) == (first.n_head, first.n_head_kv, first.n_ff) and b.n_head > 0
                  and not b.dummy_head and not b.zero_mlp for b in blocks) and len(blocks) == adapter.num_layers
    return blocks, uniform


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


def _write_llama(writer_factory, model, adapter: ArchAdapter, dtype: str, report: dict) -> TensorSink:
    config = model.config
    blocks, uniform = _layout_llama(adapter)
    arch = "llama" if uniform else "deci"
    writer = writer_factory(arch)
    sink = TensorSink(writer, dtype)
    att0 = adapter.attention(next(i for i in range(adapter.num_layers) if adapter.attention(i).units > 0)
                             if any(adapter.attention(i).units for i in range(adapter.num_layers)) else 0)
    head_dim = att0.head_dim
    d = config.hidden_size
    pick = (lambda f: f(blocks[0])) if uniform else (lambda f: [f(b) for b in blocks])
    add_shape_keys(writer, config, len(blocks), pick(lambda b: b.n_ff), pick(lambda b: b.n_head),
                   pick(lambda b: b.n_head_kv), head_dim, head_dim)
    _rope_keys(writer, config, head_dim, sink)
    add_embeddings(model, sink)
    zero_head = np.zeros((head_dim, d), np.float32)
    for n, b in enumerate(blocks):
        layer = adapter.layers()[b.source]
        att, mlp = adapter.attention(b.source), adapter.mlp(b.source)
        p = f"blk.{n}"
        if b.n_head > 0:
            sink.add(f"{p}.attn_norm.weight", _np(layer.input_layernorm.weight))
            if b.dummy_head:
                sink.add(f"{p}.attn_q.weight", zero_head)
                sink.add(f"{p}.attn_k.weight", zero_head)
                sink.add(f"{p}.attn_v.weight", zero_head)
                sink.add(f"{p}.attn_output.weight", zero_head.T)
            else:
                sink.add(f"{p}.attn_q.weight", rotary_permute(_np(att.q.weight), b.n_head))
                sink.add(f"{p}.attn_k.weight", rotary_permute(_np(att.k.weight), b.n_head_kv))
                sink.add(f"{p}.attn_v.weight", _np(att.v.weight))
                sink.add(f"{p}.attn_output.weight", _np(att.out.weight))
                for name, lin, heads in (("attn_q", att.q, b.n_head), ("attn_k", att.k, b.n_head_kv), ("attn_v", att.v, 0)):
                    if lin.bias is not None:
                        sink.add(f"{p}.{name}.bias", rotary_permute(_np(lin.bias), heads))
            if att.out.bias is not None:
                sink.add(f"{p}.attn_output.bias", _np(att.out.bias))
        if b.n_ff > 0:
            sink.add(f"{p}.ffn_norm.weight", _np(layer.post_attention_layernorm.weight))
            if b.zero_mlp:
                zero = np.zeros((ZERO_MLP_WIDTH, d), np.float32)
                sink.add(f"{p}.ffn_gate.weight", zero)
                sink.add(f"{p}.ffn_up.weight", zero)
                sink.add(f"{p}.ffn_down.weight", zero.T)
            else:
                gate, up = mlp.inputs
                sink.add(f"{p}.ffn_gate.weight", _np(gate.weight))
                sink.add(f"{p}.ffn_up.weight", _np(up.weight))
                sink.add(f"{p}.ffn_down.weight", _np(mlp.out.weight))
                for name, lin in (("ffn_gate", gate), ("ffn_up", up)):
                    if lin.bias is not None:
                        sink.add(f"{p}.{name}.bias", _np(lin.bias))
            if mlp.out.bias is not None:
                sink.add(f"{p}.ffn_down.bias", _np(mlp.out.bias))
    report.update(architecture=arch, blocks=[b.__dict__ for b in blocks],
                  padded=[f"layer {b.source}: {note}" for b in blocks for note in b.notes],
                  removed_layers=[i for i in range(adapter.num_layers) if i not in {b.source for b in blocks}])
    return sink


def _write_phi(writer_factory, model, adapter: ArchAdapter, dtype: str, report: dict) -> TensorSink:
    config = model.config
    writer = writer_factory("phi2")
    sink = TensorSink(writer, dtype)
    d = config.hidden_size
    n_head = config.num_attention_heads
    head_dim = d // n_head
    if config.num_key_value_heads != n_head or getattr(config, "qk_layernorm", False):
        raise BonsaiError("llama.cpp's phi2 has no grouped-query attention or q/k LayerNorm; this Phi cannot be exported")
    n_ff = max(adapter.mlp(i).units for i in range(adapter.num_layers)) or ZERO_MLP_WIDTH
    rotary = int(head_dim * float((config.rope_parameters or {}).get("partial_rotary_factor", 1.0)))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(adapter.num_layers)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(rotary)
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_freq_base(float((config.rope_parameters or {}).get("rope_theta", 10000.0)))
    sink.add("token_embd.weight", _np(model.get_input_embeddings().weight))
    sink.add("output_norm.weight", _np(model.model.final_layernorm.weight))
    sink.add("output_norm.bias", _np(model.model.final_layernorm.bias))
    sink.add("output.weight", _np(model.lm_head.weight))
    sink.add("output.bias", _np(model.lm_head.bias))
    padded, written, real = [], 0, 0
    for i in range(adapter.num_layers):
        layer, att, mlp = adapter.layers()[i], adapter.attention(i), adapter.mlp(i)
        p = f"blk.{i}"
        rows = att.units * att.unit_width
        extra_heads = n_head - att.units * att.queries_per_kv
        extra_ch = n_ff - mlp.units
        if extra_heads:
            padded.append(f"layer {i}: {extra_heads} zero heads")
        if extra_ch:
            padded.append(f"layer {i}: {extra_ch} zero MLP channels")

        def pad_rows(w: np.ndarray, total: int) -> np.ndarray:
            return np.concatenate([w, np.zeros((total - w.shape[0], *w.shape[1:]), np.float32)])

        sink.add(f"{p}.attn_norm.weight", _np(layer.input_layernorm.weight))
        sink.add(f"{p}.attn_norm.bias", _np(layer.input_layernorm.bias))
        for name, lin in (("attn_q", att.q), ("attn_k", att.k), ("attn_v", att.v)):
            sink.add(f"{p}.{name}.weight", pad_rows(_np(lin.weight), d))
            sink.add(f"{p}.{name}.bias", pad_rows(_np(lin.bias), d))
        sink.add(f"{p}.attn_output.weight", pad_rows(_np(att.out.weight).T, d).T)
        sink.add(f"{p}.attn_output.bias", _np(att.out.bias))
        (fc1,) = mlp.inputs
        sink.add(f"{p}.ffn_up.weight", pad_rows(_np(fc1.weight), n_ff))
        sink.add(f"{p}.ffn_up.bias", pad_rows(_np(fc1.bias), n_ff))
        sink.add(f"{p}.ffn_down.weight", pad_rows(_np(mlp.out.weight).T, n_ff).T)
        sink.add(f"{p}.ffn_down.bias", _np(mlp.out.bias))
        real += 4 * rows * d + mlp.units * 2 * d
        written += 4 * d * d + n_ff * 2 * d
    report.update(architecture="phi2", padded=padded, removed_layers=[],
                  padding_overhead_params=written - real,
                  note="llama.cpp's phi2 builds every layer from one size and needs the full attention width: "
                       "pruned heads and channels are written back as zeros (exact, larger)")
    return sink


PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _model_name(name: str, tokenizer) -> str:
    """`general.name`, kept unless llama.cpp would crash on it: it gives Phi-3's special tokens their attributes
    whenever the name contains "phi-3"/"phi3" and fails to load a vocabulary without those tokens."""
    import re

    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if re.search(r"phi-?3", name, re.IGNORECASE) and not all(t in vocab for t in PHI3_NAMED_TOKENS):
        return re.sub(r"(phi)-?(3)", r"\1_\2", name, flags=re.IGNORECASE)
    return name


@register_writer("gguf")
def write_gguf(model, tokenizer, out: Path, dtype: str, source: str = "", allow_fallback: bool = False) -> dict:
    """Write `model` (float32, CPU) and its tokenizer as one GGUF file at `out` (atomically). K-quants go
    through llama.cpp's own quantiser; `allow_fallback` lets it store rows it cannot block in another type."""
    gguf = _require_gguf()
    from bonsai.export.gguf_vocab import add_tokenizer

    if dtype not in DTYPES:
        raise BonsaiError(f"unknown --dtype {dtype!r} for gguf: choose from {', '.join(DTYPES)}")
    if dtype in K_QUANTS:
        return _write_k_quant(model, tokenizer, Path(out), dtype, source, allow_fallback)
    from bonsai.export.gguf_native import GEMMA_ARCH, NATIVE, write_gemma, write_granite, write_native, write_phi3

    adapter = get_adapter(model)
    model_type = model.config.model_type
    if model_type not in (*LLAMA_LIKE, "phi", *NATIVE):
        raise BonsaiError(f"GGUF export supports {', '.join((*LLAMA_LIKE, 'phi', *NATIVE))}; not {model_type!r} yet")
    layout = (_write_llama if model_type in LLAMA_LIKE else _write_phi if model_type == "phi"
              else write_phi3 if model_type == "phi3" else write_granite if model_type == "granite"
              else write_gemma if model_type in GEMMA_ARCH else write_native)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    report: dict = {"source": source, "file": str(out), "dtype": dtype}
    writers = []

    def factory(arch: str):
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(_model_name(Path(source).name if source else model_type, tokenizer))
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writers.append(w)
        return w

    try:
        with disk_errors(out):
            with torch.no_grad():
                sink = layout(factory, model, adapter, dtype, report)
            writer = writers[0]
            add_tokenizer(writer, tokenizer, model)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    report.update(tensor_types=sink.types, params_written=sink.params,
                  model_params=sum(p.numel() for p in model.parameters()), bytes=out.stat().st_size)
    return report


def _write_k_quant(model, tokenizer, out: Path, dtype: str, source: str, allow_fallback: bool) -> dict:
    """f32 GGUF first, then llama.cpp's quantiser (llama-cpp-python), then the types it chose, read back."""
    gguf = _require_gguf()
    from bonsai.export.llamacpp import _llama_cpp

    llama_cpp = _llama_cpp()
    adapter = get_adapter(model)
    hidden = model.config.hidden_size
    odd = sorted({n for i in range(adapter.num_layers)
                  for n in (adapter.mlp(i).units, adapter.attention(i).out.in_features) if n and n % K_BLOCK})
    if (odd or hidden % K_BLOCK) and not allow_fallback:
        what = (f"widths {odd[:6]} (MLP channels, or attention heads x head size); prune with --width-multiple "
                f"{K_BLOCK} (and --head-multiple)" if odd else f"a hidden size of {hidden}")
        raise BonsaiError(f"{dtype} needs rows that are multiples of {K_BLOCK} long and this model has {what}; "
                          "llama.cpp would silently store those in another type (--allow-fallback accepts that)")
    staging = out.with_name(f".{out.name}.f32-{uuid.uuid4().hex[:8]}")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        report = write_gguf(model, tokenizer, staging, "f32", source)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, K_QUANTS[dtype])
        params.nthread = max(1, os.cpu_count() or 1)
        if llama_cpp.llama_model_quantize(str(staging).encode(), str(tmp).encode(), params) != 0:
            raise BonsaiError(f"llama.cpp could not quantise the export to {dtype}")
        os.replace(tmp, out)
    finally:
        for path in (staging, tmp):
            if path.exists():
                path.unlink()
    reader = gguf.GGUFReader(str(out))
    report.update(file=str(out), dtype=dtype, bytes=out.stat().st_size,
                  tensor_types={t.name: t.tensor_type.name.lower() for t in reader.tensors})
    report["k_quant_fallback"] = sorted(n for n, t in report["tensor_types"].items()
                                        if n.startswith("blk.") and t != "f32" and not t.endswith("_k"))
    return report
