#!/usr/bin/env python
"""Build the shipped tiny corpus: the King James Bible (public domain) split into train/test by chapter.

Source: Debian's `bible-kjv-text` data read through its `bible` program (`apt-get install bible-kjv`).
Every 20th chapter goes to the test split, so test text is held out from training and pruning.
"""

from __future__ import annotations

import argparse
import gzip
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bonsai" / "assets" / "kjv"


def chapters(raw: str) -> list[str]:
    """Turn `bible`'s wrapped, numbered output into one block per chapter, a verse per line."""
    blocks, title, verses = [], None, []
    for line in raw.splitlines():
        if not line.strip():
            continue
        if re.match(r"^\S.* \d+$", line) and not line.startswith(" "):
            if title and verses:
                blocks.append(title + "\n\n" + "\n".join(verses))
            title, verses = line.strip(), []
        elif m := re.match(r"^\s+\d+ (.*)$", line):
            verses.append(m.group(1).strip())
        else:  # continuation of a wrapped verse
            verses[-1] += " " + line.strip()
    if title and verses:
        blocks.append(title + "\n\n" + "\n".join(verses))
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", help="text printed by `bible gen1:1-rev22:21` (default: run it)")
    parser.add_argument("--test-every", type=int, default=20)
    args = parser.parse_args()
    raw = Path(args.raw).read_text() if args.raw else subprocess.run(
        ["bible", "-l200", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    blocks = chapters(raw)
    test = [b for i, b in enumerate(blocks) if i % args.test_every == args.test_every // 2]
    train = [b for i, b in enumerate(blocks) if i % args.test_every != args.test_every // 2]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with gzip.open(OUT / f"{name}.txt.gz", "wt", compresslevel=9) as f:
            f.write("\n\n".join(part) + "\n")
        print(f"{name}: {len(part)} chapters, {sum(map(len, part))} characters")


if __name__ == "__main__":
    main()
