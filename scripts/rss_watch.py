#!/usr/bin/env python
"""Run a command and sample its resident memory (with its children's) from /proc every few milliseconds: the true
peak and when it happened, whatever the process does to its own peak counters.

    python scripts/rss_watch.py --every 0.02 --out rss.tsv -- bonsai prune --model ... --out ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=float, default=0.02, help="seconds between samples")
    p.add_argument("--out", help="write 'seconds<TAB>MiB' samples here")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.time()
    child = subprocess.Popen(cmd)
    peak, at, samples = 0, 0.0, []
    while child.poll() is None:
        rss = tree_rss(child.pid)
        now = time.time() - start
        if rss > peak:
            peak, at = rss, now
        samples.append((now, rss))
        time.sleep(args.every)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(f"{t:.3f}\t{r / 2**20:.1f}\n" for t, r in samples)
    print(f"rss_watch: peak {peak / 2**20:.0f} MiB at {at:.1f} s of {time.time() - start:.1f} s (exit {child.returncode})",
          file=sys.stderr)
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
