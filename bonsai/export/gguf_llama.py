"""GGUF layouts of the LLaMA family (LLaMA-1/2/3, Mistral, Qwen2; Granite) and of Phi-2.

* LLaMA-1/2/3, Mistral, Qwen2: `llama` when every layer has the same attention and MLP sizes, else `deci`,
  which reads per-layer arrays for `head_count`, `head_count_kv` and `feed_forward_length` and builds each
  layer with its own sizes. Q and K (weights and biases) are permuted to llama.cpp's rotary layout per layer.
* Granite is LLaMA's layout plus its four scalar multipliers, and needs the same sizes in every layer
  (llama.cpp's granite loader takes every layer's sizes from layer 0).
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

from dataclasses import dataclass, field

import numpy as np

from bonsai.adapters.base import ArchAdapter
from bonsai.errors import BonsaiError
from bonsai.export.gguf_tensors import (
    ZERO_MLP_WIDTH,
    TensorSink,
    _np,
    _rope_keys,
    add_embeddings,
    add_shape_keys,
    rotary_permute,
    uniform_sizes,
)

LLAMA_LIKE = ("llama", "mistral", "qwen2")


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


def write_llama(writer_factory, model, adapter: ArchAdapter, dtype: str, report: dict) -> TensorSink:
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


def write_phi(writer_factory, model, adapter: ArchAdapter, dtype: str, report: dict) -> TensorSink:
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


def write_granite(writer_factory, model, adapter: ArchAdapter, dtype: str, report: dict) -> TensorSink:
    """Granite 3.x as llama.cpp's granite: the llama layout with its embedding, residual, attention and logit
    multipliers (uniform sizes only: llama.cpp's granite loader takes every layer's sizes from layer 0)."""

    config = model.config
    uniform_sizes(adapter, "granite")

    def granite(_arch: str):
        writer = writer_factory("granite")
        writer.add_attention_scale(float(config.attention_multiplier))
        writer.add_embedding_scale(float(config.embedding_multiplier))
        writer.add_residual_scale(float(config.residual_multiplier))
        writer.add_logit_scale(float(config.logits_scaling))
        return writer

    sink = write_llama(granite, model, adapter, dtype, report)
    report["architecture"] = "granite"
    return sink
