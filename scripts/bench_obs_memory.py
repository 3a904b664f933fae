#!/usr/bin/env python
"""Memory of one MLP group's sequential OBS at a real width: on a copy of H^-1 (before) against on H^-1 itself with
the probes' columns set aside (now), side by side, each in its own process.

The unit errors of a group with compensation kept need H^-1 (n x n), the path's W^T W (n x n) and, for the probes,
the candidates' columns of the *original* H^-1. The path used to work on a copy of H^-1, so three n x n matrices
were held at once: 2.5 GB for LLaMA-3-8B's 14,336-wide MLP in float32, more than a 2-layer model's blocks. Now the
path consumes H^-1 and the columns are read back from a copy set aside in a file (CPU) or host memory (GPU).

    python scripts/bench_obs_memory.py --width 14336 --out-features 4096 --steps 256

Prints each way's peak resident memory over what was held before the step (sampled from /proc every 5 ms), in
MiB and in n x n matrices, and checks that both give the same errors and columns.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    import torch

    from bonsai.engine.obs import columns_of, damped_inverse, sequential_obs_errors, set_aside
    from bonsai.engine.spill import SpillStore
    from bonsai.runtime import release_memory

    g = torch.Generator().manual_seed(0)
    n, out = args.width, args.out_features
    X = torch.randn(256, n, generator=g)
    gram = X.t() @ X
    del X
    hinv = damped_inverse(gram, 0.01)
    del gram
    W = torch.randn(out, n, generator=g)
    cols = torch.arange(0, n, 2)
    release_memory()
    base, peak, stop = _rss(), [0], [False]

    def watch():
        while not stop[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    if args.way == "copy":
        errors = sequential_obs_errors(W, hinv, 1, args.steps)
        kept = hinv[:, cols].clone()
    else:
        aside = set_aside(hinv, SpillStore())
        errors = sequential_obs_errors(W, hinv, 1, args.steps, in_place=True)
        del hinv
        kept = columns_of(aside, cols)
    stop[0] = True
    thread.join()
    digest = [float(errors.double().sum()), float(kept.double().sum())]
    print(json.dumps({"peak_over_held": peak[0] - base, "digest": digest}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=14336)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--way", choices=["copy", "in-place"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.way:
        return child(args)
    matrix = args.width ** 2 * 4
    rows = {}
    for way in ("copy", "in-place"):
        cmd = [sys.executable, __file__, "--width", str(args.width), "--out-features", str(args.out_features),
               "--steps", str(args.steps), "--way", way]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[way] = json.loads(done.stdout.strip().splitlines()[-1])
        r = rows[way]
        print(f"{way:9s} peak over held {r['peak_over_held'] / 2**20:8.0f} MiB = {r['peak_over_held'] / matrix:.2f} "
              f"n x n matrices (n = {args.width}, float32)")
    same = rows["copy"]["digest"] == rows["in-place"]["digest"]
    print(f"in-place / copy: {rows['in-place']['peak_over_held'] / rows['copy']['peak_over_held']:.2f}x; "
          f"errors and columns identical: {same}")


if __name__ == "__main__":
    main()
