"""GGUF layouts for families that llama.cpp runs as their own architecture (Qwen3, OLMo-2, Phi-3, Granite).

Those architectures build every layer from one set of sizes (see the shared notes on llama.cpp's per-layer
support: only `deci` reads per-layer arrays, and `deci` has no q/k norms or post-norms), so a pruned model of
these families is written only when every layer kept the same attention units and MLP channels, which
`bonsai prune --allocation uniform` guarantees. Everything else is refused in one line that says so.

Phi-3 (and Phi-3.5 / Phi-4-mini) is written as `phi3`, whose loader fixes the query and output widths at the
hidden size: pruned key/value groups are padded back with zero q/k/v rows and zero output columns, and every
layer's MLP is padded with zero channels to the widest one (exact: a zero key scores every position alike, a
zero value adds nothing, and a zero gate row gives SiLU(0) = 0), so only the MLP savings of the widest layer
carry over; the report gives the overhead. LongRoPE goes as llama.cpp's long/short factor tensors and
attention factor; llama.cpp picks the long factors by context size, transformers by sequence length.

Gemma 1/2/3 (text) become `gemma`, `gemma2`, `gemma3` (uniform sizes only): norms stored as 1 + w (Gemma's
RMSNorm), the per-layer sliding/global pattern written as an array from the config's layer types, Gemma-2's
soft-capping, Gemma-3's local rotary base. llama.cpp scales queries by 1/sqrt(head_dim) (27B: by the hidden
size over the head count) where transformers uses query_pre_attn_scalar^-1/2: the ratio is folded into the
query weights (Gemma-3: into its q-norm, which comes after them).

Granite is LLaMA's layout (q/k permuted to llama.cpp's rotary pairs) plus its four scalar multipliers, and like
Qwen3 needs the same sizes in every layer.

Qwen3, OLMo-2 and Phi-3 use llama.cpp's NEOX rotary layout (pairs i and i + d/2, transformers' rotate-half), so q and k are
written as they are, without the permutation the `llama` layout needs.
"""

from __future__ import annotations

import math

import numpy as np

from bonsai.adapters.base import ArchAdapter
from bonsai.errors import BonsaiError
from bonsai.export.gguf_tensors import ZERO_MLP_WIDTH, TensorSink, _np, _rope_keys, add_embeddings, add_shape_keys, uniform_sizes

GEMMA_ARCH = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}




def _common_keys(writer, config, adapter: ArchAdapter, sink: TensorSink, units: int, channels: int) -> int:
    att = adapter.attention(0)
    add_shape_keys(writer, config, adapter.num_layers, channels, units * att.queries_per_kv, units, att.head_dim,
                   att.head_dim)
    _rope_keys(writer, config, att.head_dim, sink)
    return att.head_dim


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
    add_embeddings(model, sink, output=True if model_type == "olmo2" else None)  # llama.cpp's olmo2 requires output
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


def _pad_rows(w: np.ndarray, total: int) -> np.ndarray:
    return np.concatenate([w, np.zeros((total - w.shape[0], *w.shape[1:]), np.float32)])


def _longrope(writer, config, rotary: int, sink: TensorSink) -> None:
    params = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_rope_freq_base(float(params.get("rope_theta", 10000.0)))
    kind = (params.get("rope_type") or "default").lower()
    if kind == "default":
        return
    if kind not in ("longrope", "su"):
        raise BonsaiError(f"Phi-3 rope scaling {kind!r} has no GGUF form in bonsai's exporter yet (longrope only)")
    orig = int(params.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    long_f, short_f = params["long_factor"], params["short_factor"]
    if len(long_f) != rotary // 2 or len(short_f) != rotary // 2:
        raise BonsaiError(f"LongRoPE factors must have {rotary // 2} entries (got {len(long_f)}, {len(short_f)})")
    factor = config.max_position_embeddings / orig
    attn = params.get("attention_factor")
    if attn is None:
        attn = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
    writer.add_rope_scaling_orig_ctx_len(orig)
    writer.add_rope_scaling_attn_factors(float(attn))
    sink.add("rope_factors_long.weight", np.asarray(long_f, np.float32))
    sink.add("rope_factors_short.weight", np.asarray(short_f, np.float32))


def write_phi3(writer_factory, model, adapter: ArchAdapter, dtype: str, report: dict) -> TensorSink:
    """Phi-3 as llama.cpp's phi3: full attention width and one MLP width, pruned parts padded with zeros."""
    config = model.config
    _no_biases(adapter, "phi3")
    d, n_head, n_kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = d // n_head
    q_per_kv = n_head // n_kv
    n_ff = max(adapter.mlp(i).units for i in range(adapter.num_layers)) or ZERO_MLP_WIDTH
    rotary = int(head_dim * float((config.rope_parameters or {}).get("partial_rotary_factor", 1.0)))
    writer = writer_factory("phi3")
    sink = TensorSink(writer, dtype)
    add_shape_keys(writer, config, adapter.num_layers, n_ff, n_head, n_kv, head_dim, rotary)
    _longrope(writer, config, rotary, sink)
    add_embeddings(model, sink)
    padded, written, real = [], 0, 0
    for i in range(adapter.num_layers):
        layer, att, mlp = adapter.layers()[i], adapter.attention(i), adapter.mlp(i)
        p = f"blk.{i}"
        units, channels = att.units, mlp.units
        qkv = _np(att.q.weight)
        q, k, v = qkv[:att.k_start], qkv[att.k_start:att.v_start], qkv[att.v_start:]
        if units < n_kv:
            padded.append(f"layer {i}: {n_kv - units} zero key/value groups")
        if channels < n_ff:
            padded.append(f"layer {i}: {n_ff - channels} zero MLP channels")
        sink.add(f"{p}.attn_norm.weight", _np(layer.input_layernorm.weight))
        sink.add(f"{p}.attn_qkv.weight", np.concatenate([_pad_rows(q, n_head * head_dim),
                                                         _pad_rows(k, n_kv * head_dim), _pad_rows(v, n_kv * head_dim)]))
        sink.add(f"{p}.attn_output.weight", _pad_rows(_np(att.out.weight).T, n_head * head_dim).T)
        sink.add(f"{p}.ffn_norm.weight", _np(layer.post_attention_layernorm.weight))
        gate_up = _np(mlp.inputs[0].weight)
        gate, up = gate_up[:channels], gate_up[channels:]
        sink.add(f"{p}.ffn_up.weight", np.concatenate([_pad_rows(gate, n_ff), _pad_rows(up, n_ff)]))
        sink.add(f"{p}.ffn_down.weight", _pad_rows(_np(mlp.out.weight).T, n_ff).T)
        real += units * q_per_kv * head_dim * 2 * d + units * head_dim * 2 * d + channels * 3 * d
        written += 2 * (n_head + n_kv) * head_dim * d + n_ff * 3 * d
    report.update(architecture="phi3", padded=padded, removed_layers=[], padding_overhead_params=written - real,
                  note="llama.cpp's phi3 builds every layer with the full attention width and one MLP width: "
                       "pruned key/value groups and channels are written back as zeros (exact, larger)")
    return sink




def _llama_cpp_gemma_scale(arch: str, n_layer: int, d: int, n_head: int, head_dim: int) -> float:
    """The query scale llama.cpp's gemma2/gemma3 use (their load_arch_hparams: 27B by layer count)."""
    big = (arch == "gemma2" and n_layer == 46) or (arch == "gemma3" and n_layer == 62)
    return 1.0 / math.sqrt(d / n_head if big else head_dim)


def write_gemma(writer_factory, model, adapter: ArchAdapter, dtype: str, report: dict) -> TensorSink:
    """Gemma 1/2/3 (text) as llama.cpp's gemma/gemma2/gemma3, for models with the same sizes in every layer."""
    config, model_type = model.config, model.config.model_type
    arch = GEMMA_ARCH[model_type]
    units, channels = uniform_sizes(adapter, model_type)
    _no_biases(adapter, model_type)
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise BonsaiError(f"llama.cpp's {arch} uses the tanh GELU; this model's activation is {act!r}")
    att0 = adapter.attention(0)
    head_dim, n_head = att0.head_dim, units * att0.queries_per_kv
    d, n_layer = int(config.hidden_size), adapter.num_layers
    writer = writer_factory(arch)
    sink = TensorSink(writer, dtype)
    params = dict(getattr(config, "rope_parameters", None) or {})
    full = params.get("full_attention", params)
    local = params.get("sliding_attention", full)
    for name, rope in (("global", full), ("local", local)):
        if (rope.get("rope_type") or "default") not in ("default", "linear"):
            raise BonsaiError(f"{model_type} {name} rope scaling {rope.get('rope_type')!r} has no GGUF form in bonsai's "
                              "exporter yet")
    if (local.get("rope_type") or "default") != "default":
        raise BonsaiError(f"{model_type}: scaled rotary on the sliding layers has no llama.cpp form")
    add_shape_keys(writer, config, n_layer, channels, n_head, units, head_dim, head_dim)
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if (full.get("rope_type") or "default") == "linear":
        writer.add_rope_scaling_type(sink.gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    scale = 1.0
    if arch in ("gemma2", "gemma3"):
        layer_types = list(getattr(config, "layer_types", None) or [])
        if len(layer_types) != n_layer:
            raise BonsaiError(f"{model_type}: the config has no per-layer attention types to write")
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        if arch == "gemma3":
            writer.add_rope_freq_base_swa(float(local.get("rope_theta", 10000.0)))
        caps = {"attention": getattr(config, "attn_logit_softcapping", None),
                "final": getattr(config, "final_logit_softcapping", None)}
        if arch == "gemma2":
            if caps["attention"] is None or caps["final"] is None:
                raise BonsaiError("llama.cpp's gemma2 always soft-caps attention and logits; this Gemma-2 turns "
                                  "soft-capping off")
            writer.add_attn_logit_softcapping(float(caps["attention"]))
        elif caps["attention"] is not None:
            raise BonsaiError("llama.cpp's gemma3 has no attention soft-capping; this Gemma-3 sets it")
        if caps["final"] is not None:
            writer.add_final_logit_softcapping(float(caps["final"]))
        qpas = float(getattr(config, "query_pre_attn_scalar", head_dim) or head_dim)
        scale = (qpas ** -0.5) / _llama_cpp_gemma_scale(arch, n_layer, d, n_head, head_dim)

    def norm(module) -> np.ndarray:  # Gemma's RMSNorm multiplies by 1 + w
        return _np(module.weight) + 1.0

    untied = model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    if untied and arch != "gemma3":
        raise BonsaiError(f"llama.cpp's {arch} reuses the token embeddings as the output layer; this model's "
                          "output layer is untied")
    add_embeddings(model, sink, norm=norm(model.model.norm), output=untied)
    for i in range(n_layer):
        layer, att, mlp = adapter.layers()[i], adapter.attention(i), adapter.mlp(i)
        p = f"blk.{i}"
        q = _np(att.q.weight)
        sink.add(f"{p}.attn_norm.weight", norm(layer.input_layernorm))
        if arch == "gemma3":  # the q-norm follows q_proj: scale its output instead
            sink.add(f"{p}.attn_q_norm.weight", norm(att.module.q_norm) * scale)
            sink.add(f"{p}.attn_k_norm.weight", norm(att.module.k_norm))
        else:
            q = q * scale
        sink.add(f"{p}.attn_q.weight", q)
        sink.add(f"{p}.attn_k.weight", _np(att.k.weight))
        sink.add(f"{p}.attn_v.weight", _np(att.v.weight))
        sink.add(f"{p}.attn_output.weight", _np(att.out.weight))
        _mlp(sink, p, mlp)
        if arch == "gemma":
            sink.add(f"{p}.ffn_norm.weight", norm(layer.post_attention_layernorm))
        else:
            sink.add(f"{p}.post_attention_norm.weight", norm(layer.post_attention_layernorm))
            sink.add(f"{p}.ffn_norm.weight", norm(layer.pre_feedforward_layernorm))
            sink.add(f"{p}.post_ffw_norm.weight", norm(layer.post_feedforward_layernorm))
    report.update(architecture=arch, padded=[], removed_layers=[], query_scale_folded=scale,
                  blocks=[{"source": i, "n_head": n_head, "n_head_kv": units, "n_ff": channels} for i in range(n_layer)])
    return sink
