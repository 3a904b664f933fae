#!/usr/bin/env python
"""Build `tests/tasks/austen_cloze`: a 4-way multiple-choice cloze task on held-out Austen sentences (lm-eval).

Each item is the first ~60% of a sentence from the Austen test split (chapters never used for training,
pruning or calibration); the choices are its true ending and the endings of three other random
sentences. Chance is 0.25. Used offline by the quality matrix (`scripts/quality_matrix.py --tasks`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "tasks" / "austen_cloze"


def sentences(text: str) -> list[str]:
    found = []
    for para in text.splitlines():
        for s in re.split(r"(?<=[.!?])\s+", para.strip()):
            words = s.split()
            if 12 <= len(words) <= 40 and s[0].isupper() and '"' not in s and "_" not in s:
                found.append(s)
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import sys

    sys.path.insert(0, str(ROOT))
    from bonsai.data.sources import load_text

    pool = sentences(load_text("austen", "test").text)
    rng = random.Random(args.seed)
    rng.shuffle(pool)
    items = []
    for s in pool[: args.items]:
        words = s.split()
        cut = int(len(words) * 0.6)
        context, ending = " ".join(words[:cut]), " " + " ".join(words[cut:])
        others = []
        while len(others) < 3:
            o = rng.choice(pool).split()
            cand = " " + " ".join(o[int(len(o) * 0.6):])
            if cand != ending and cand not in others:
                others.append(cand)
        label = rng.randrange(4)
        choices = others[:label] + [ending] + others[label:]
        items.append({"context": context, "choices": choices, "label": label})
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "austen_cloze.jsonl").open("w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    (OUT / "austen_cloze.yaml").write_text(f"""# A {len(items)}-item multiple-choice cloze task on held-out Austen sentences (built by
# scripts/build_austen_cloze.py from bonsai/assets/austen/test.txt.gz): pick the true ending of a sentence among
# four. Used offline by scripts/quality_matrix.py --tasks; data_files is relative to the repository root.
task: austen_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: tests/tasks/austen_cloze/austen_cloze.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    print(f"{len(items)} items from {len(pool)} sentences")


if __name__ == "__main__":
    main()
