#!/usr/bin/env python
"""Hashes of what every method writes, on three tiny models: the before/after check of a refactor (issue 40).

A change of layout must not change a single output bit. Run this before the move (`--out before.json`) and after
it (`--compare before.json`, exit 1 and the differing cells listed when anything moved). Each cell is one
`bonsai prune` in its own process on the same machine and thread count (floating-point results differ between
CPUs, so hashes are compared on the machine that took them, not committed as test data):

    python scripts/output_hashes.py --out runs/hashes-before.json
    python scripts/output_hashes.py --compare runs/hashes-before.json

Models: the shipped tiny LLaMA, a random tiny Mistral (grouped-query attention, 4 key/value groups of 2 query
heads) and a random tiny Phi (parallel block, LayerNorm, partial rotary), both with the shipped tokenizer.
Methods: bonsai's default and paper selection, prior-only, random, FLAP, LLM-Pruner, Wanda 2:4 (50%) and BESA, at
30% with small calibration budgets (a whole run of every cell takes a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COMMON = ["--calib", "kjv", "--calib-samples", "4", "--seqlen", "32", "--batch-size", "4",
          "--seed", "0", "--reconstruct-samples", "16", "--dtype", "float32", "--device", "cpu"]
METHODS = {
    "bonsai": [],
    "bonsai-paper": ["--selection", "paper", "--samples", "8", "--p-iter", "0.15"],
    "prior-only": ["--method", "prior-only", "--p-iter", "0.15"],
    "random": ["--method", "random", "--p-iter", "0.15", "--samples", "8"],
    "flap": ["--method", "flap"],
    "llm-pruner": ["--method", "llm-pruner"],
    "wanda-2:4": ["--method", "wanda", "--sparsity-type", "2:4", "--sparsity", "0.5"],
    "besa": ["--method", "besa"],
}


def build_models(root: Path) -> dict[str, Path]:
    """The shipped tiny model and random tiny Mistral / Phi checkpoints with its tokenizer (fixed seeds)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_model
    from transformers import AutoTokenizer

    from bonsai.models.aliases import TINY_MODEL_DIR
    from bonsai.models.saving import save_pruned

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    models = {"tiny": Path(TINY_MODEL_DIR)}
    for family in ("mistral", "phi"):
        model = tiny_model(family, "sdpa", vocab_size=len(tokenizer))
        models[family] = Path(save_pruned(model, tokenizer, root / family))
    return models


def digest(folder: Path) -> dict:
    """sha256 of every saved tensor (name, dtype, shape and bytes, in name order) and of the kept units."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(f)
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").exists() else {}
    kept = hashlib.sha256(json.dumps(report.get("kept_units"), sort_keys=True).encode()).hexdigest()
    return {"weights": h.hexdigest(), "kept_units": kept, "sparsity": report.get("totals", {}).get("sparsity")}


def run(methods: list[str], models: list[str]) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bonsai-hashes-") as tmp:
        paths = build_models(Path(tmp) / "models")
        for model in models:
            for method in methods:
                out = Path(tmp) / "runs" / model / method
                cmd = [sys.executable, "-m", "bonsai", "prune", "--model", str(paths[model]), "--out", str(out),
                       *COMMON, *METHODS[method], "--quiet"]
                if "--sparsity" not in METHODS[method]:
                    cmd += ["--sparsity", "0.3"]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                cell = f"{model}/{method}"
                if done.returncode != 0:
                    results[cell] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
                else:
                    results[cell] = digest(out)
                print(f"{cell}: {results[cell]}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the hashes here")
    p.add_argument("--compare", help="compare with hashes written before; exit 1 on any difference")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--models", default="tiny,mistral,phi")
    args = p.parse_args()
    results = run(args.methods.split(","), args.models.split(","))
    if args.out:
        Path(args.out).write_text(json.dumps({"threads": os.environ.get("OMP_NUM_THREADS"), "cells": results},
                                             indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(Path(args.compare).read_text())["cells"]
        moved = [cell for cell in results if before.get(cell) != results[cell]]
        for cell in moved:
            print(f"DIFFERENT {cell}: before {before.get(cell)}, now {results[cell]}")
        print(f"{len(results) - len(moved)} of {len(results)} cells identical")
        raise SystemExit(1 if moved else 0)


if __name__ == "__main__":
    main()
