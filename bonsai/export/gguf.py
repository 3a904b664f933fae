"""GGUF for llama.cpp, written in pure Python through the `gguf` package (the `[export]` extra).

One layout writer per family, chosen by `model_type` from `LAYOUTS`: the LLaMA family (`llama`, or `deci` for
per-layer sizes), Granite and Phi-2 in `gguf_llama.py`; Qwen3, OLMo-2, Phi-3 and Gemma 1/2/3, which llama.cpp
runs as their own architectures with one size for every layer, in `gguf_native.py`. Each writer adds its keys
and tensors through `gguf_tensors.TensorSink`; the tokenizer goes in through `gguf_vocab.py`; K-quants are made
from an f32 file by llama.cpp's own quantiser.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from bonsai.adapters import get_adapter
from bonsai.errors import BonsaiError
from bonsai.export import register_writer
from bonsai.export.gguf_llama import write_granite, write_llama, write_phi
from bonsai.export.gguf_native import write_gemma, write_native, write_phi3
from bonsai.export.gguf_tensors import _require_gguf
from bonsai.io import disk_errors

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
K_BLOCK = 256  # a K-quant block: rows must be a multiple of this long
# model_type -> the writer of its layout: writer(writer_factory, model, adapter, dtype, report) -> TensorSink
LAYOUTS: dict[str, Callable] = {
    "llama": write_llama, "mistral": write_llama, "qwen2": write_llama, "granite": write_granite,
    "phi": write_phi, "phi3": write_phi3, "qwen3": write_native, "olmo2": write_native,
    "gemma": write_gemma, "gemma2": write_gemma, "gemma3_text": write_gemma,
}


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
    adapter = get_adapter(model)
    model_type = model.config.model_type
    if model_type not in LAYOUTS:
        raise BonsaiError(f"GGUF export supports {', '.join(LAYOUTS)}; not {model_type!r} yet")
    layout = LAYOUTS[model_type]
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
