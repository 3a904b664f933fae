#!/usr/bin/env python
"""Build the second shipped corpus: Jane Austen's six novels (public domain), split into train/test by chapter.

Source: Debian's `r-cran-janeaustenr` (1.0.0-1; the Project Gutenberg texts without their headers), read from
its R lazy-load database with the `rdata` package:

    pip install rdata && python scripts/build_austen_corpus.py        # runs `apt-get download` itself

Every 10th chapter of every novel goes to the test split (held out from training, pruning and
calibration). Wrapped lines are joined into one paragraph per line; chapters are separated by a blank line.
It is English prose of another register than the KJV, so models trained or calibrated on one can be
tested on the other.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import re
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bonsai" / "assets" / "austen"
DATA = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
CHAPTER = re.compile(r"^\s*chapter\s+[0-9ivxlc]+\.?\s*$", re.IGNORECASE)


def read_novels(root: Path) -> dict[str, list[str]]:
    """Lines of each novel from janeaustenr's `Rdata.rdb` (index in `Rdata.rdx`)."""
    import rdata

    warnings.simplefilter("ignore")  # rdata warns that a bare serialisation is "assumed RDS"
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((root / "Rdata.rdx").read_bytes())))
    rdb = (root / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        raw = zlib.decompress(rdb[offset + 4:offset + length])  # 4 bytes of length, then zlib
        novels[str(name)] = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(raw))]
    return novels


def chapters(lines: list[str]) -> list[str]:
    """One block per chapter ("Chapter N" heading, then one paragraph per line); front matter dropped."""
    blocks, current = [], None
    for line in lines + [""]:
        if CHAPTER.match(line):
            if current:
                blocks.append(current)
            current = [line.strip().title(), []]
            continue
        if current is None:
            continue
        paragraphs = current[1]
        if line.strip():
            if paragraphs and paragraphs[-1] is not None:
                paragraphs[-1] += " " + line.strip()
            else:
                paragraphs.append(line.strip())
        elif paragraphs and paragraphs[-1] is not None:
            paragraphs.append(None)  # paragraph break
    if current:
        blocks.append(current)
    return [title + "\n\n" + "\n".join(p for p in paras if p) for title, paras in blocks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deb", help="r-cran-janeaustenr .deb (default: apt-get download it)")
    parser.add_argument("--test-every", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=tmp, check=True, capture_output=True)
            deb = glob.glob(f"{tmp}/r-cran-janeaustenr_*.deb")[0]
        subprocess.run(["dpkg", "-x", deb, f"{tmp}/x"], check=True)
        novels = read_novels(Path(tmp) / "x" / DATA)
    train, test = [], []
    for name in NOVELS:
        for i, block in enumerate(chapters(novels[name])):
            (test if i % args.test_every == args.test_every // 2 else train).append(block)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with gzip.GzipFile(OUT / f"{name}.txt.gz", "wb", compresslevel=9, mtime=0) as f:
            f.write(("\n\n".join(part) + "\n").encode())
        print(f"{name}: {len(part)} chapters, {sum(map(len, part))} characters")


if __name__ == "__main__":
    main()
