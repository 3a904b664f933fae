"""GGUF layouts for families that llama.cpp runs as their own architecture (Qwen3, OLMo-2).

Those architectures build every layer from one set of sizes (see the shared notes on llama.cpp's per-layer
support: only `deci` reads per-layer arrays, and `deci` has no q/k norms or post-norms), so a pruned model of
these families is written only when every layer kept the same attention units and MLP channels, which
`bonsai prune --allocation uniform` guarantees. Everything else is refused in one line that says so.

Both use llama.cpp's NEOX rotary layout (pairs i and i + d/2, transformers' rotate-half), so q and k are
written as they are, without the permutation the `llama` layout needs.
"""

from __future__ import annotations

from bonsai.adapters.base import ArchAdapter
from bonsai.errors import BonsaiError
from bonsai.export.gguf import TensorSink, _np, _rope_keys

NATIVE = ("qwen3", "olmo2")


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


def _common_keys(writer, config, adapter: ArchAdapter, sink: TensorSink, units: int, channels: int) -> int:
    att = adapter.attention(0)
    head_dim = att.head_dim
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(adapter.num_layers)
    writer.add_feed_forward_length(channels)
    writer.add_head_count(units * att.queries_per_kv)
    writer.add_head_count_kv(units)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    _rope_keys(writer, config, head_dim, sink)
    return head_dim


def _embeddings(model, sink: TensorSink, always_output: bool) -> None:
    sink.add("token_embd.weight", _np(model.get_input_embeddings().weight))
    sink.add("output_norm.weight", _np(model.model.norm.weight))
    out = model.get_output_embeddings()
    tied = out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if always_output or not (getattr(model.config, "tie_word_embeddings", False) and tied):
        sink.add("output.weight", _np(out.weight))


def _mlp(sink: TensorSink, p: str, mlp) -> None:
    gate, up = mlp.inputs
    sink.add(f"{p}.ffn_gate.weight", _np(gate.weight))
    sink.add(f"{p}.ffn_up.weight", _np(up.weight))
    sink.add(f"{p}.ffn_down.weight", _np(mlp.out.weight))


def _no_biases(adapter: ArchAdapter, model_type: str) -> None:
    """These architectures have no linear biases in llama.cpp; a refit that added an output bias cannot go."""
    for i in range(adapter.num_layers):
        att, mlp = adapter.attention(i), adapter.mlp(i)
        for lin in (att.q, att.k, att.v, att.out, *mlp.inputs, mlp.out):
            if lin.bias is not None and bool(lin.bias.detach().abs().sum() > 0):
                raise BonsaiError(f"layer {i} has a linear bias, which llama.cpp's {model_type} cannot hold "
                                  "(prune with --reconstruct lstsq or none rather than bias)")


def write_native(writer_factory, model, adapter: ArchAdapter, dtype: str, report: dict) -> TensorSink:
    """Write a uniform Qwen3 or OLMo-2 model as llama.cpp's architecture of the same name."""
    config, model_type = model.config, model.config.model_type
    if getattr(config, "use_sliding_window", False):
        raise BonsaiError(f"sliding-window {model_type} has no GGUF form in bonsai's exporter yet")
    units, channels = uniform_sizes(adapter, model_type)
    _no_biases(adapter, model_type)
    writer = writer_factory(model_type)
    sink = TensorSink(writer, dtype)
    _common_keys(writer, config, adapter, sink, units, channels)
    _embeddings(model, sink, always_output=model_type == "olmo2")  # llama.cpp's olmo2 requires output.weight
    for i in range(adapter.num_layers):
        layer, att, mlp = adapter.layers()[i], adapter.attention(i), adapter.mlp(i)
        p = f"blk.{i}"
        sink.add(f"{p}.attn_q.weight", _np(att.q.weight))
        sink.add(f"{p}.attn_k.weight", _np(att.k.weight))
        sink.add(f"{p}.attn_v.weight", _np(att.v.weight))
        sink.add(f"{p}.attn_output.weight", _np(att.out.weight))
        sink.add(f"{p}.attn_q_norm.weight", _np(att.module.q_norm.weight))
        sink.add(f"{p}.attn_k_norm.weight", _np(att.module.k_norm.weight))
        _mlp(sink, p, mlp)
        if model_type == "qwen3":  # pre-norms, as LLaMA
            sink.add(f"{p}.attn_norm.weight", _np(layer.input_layernorm.weight))
            sink.add(f"{p}.ffn_norm.weight", _np(layer.post_attention_layernorm.weight))
        else:  # OLMo-2: norms after each sub-block only
            sink.add(f"{p}.post_attention_norm.weight", _np(layer.post_attention_layernorm.weight))
            sink.add(f"{p}.post_ffw_norm.weight", _np(layer.post_feedforward_layernorm.weight))
    report.update(architecture=model_type, padded=[], removed_layers=[],
                  blocks=[{"source": i, "n_head": units * adapter.attention(0).queries_per_kv, "n_head_kv": units,
                           "n_ff": channels} for i in range(adapter.num_layers)])
    return sink
