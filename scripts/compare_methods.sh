#!/usr/bin/env bash
# Paper Figure 2 at tiny scale: the paper's Bonsai vs its ablations on the shipped model, same settings and seed
# (the paper's algorithm: random unit masks, Lasso, LM-loss utility, no refit).
# Usage: bash scripts/compare_methods.sh [SPARSITY] [OUTROOT]
set -euo pipefail
sp=${1:-0.3}; root=${2:-runs/compare}
for m in bonsai no-regression prior-only random; do
  bonsai prune --config tiny --sparsity "$sp" --method "$m" --out "$root/$m" --force --selection paper --prior wanda \
    --no-compensate --utility loss --reconstruct none > /dev/null
  bonsai eval kjv --model "$root/$m" --batch-size 16 --json "$root/$m/eval.json" > /dev/null
  python -c "import json;r=json.load(open('$root/$m/eval.json'));print(f'$m sparsity $sp: kjv test ppl {r[\"ppl\"]:.2f}')"
done
