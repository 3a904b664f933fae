"""`bonsai eval TASK` through lm-eval, offline on the shipped custom task, against a hand loop."""

import json
from pathlib import Path

import pytest
import torch

from bonsai.cli import main
from bonsai.models.loading import load_model, load_tokenizer

pytestmark = pytest.mark.integration
pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[2]


def _hand_accuracy(model_name: str, docs: list[dict]) -> tuple[float, float]:
    """Sum of log p(choice tokens | context) per choice; acc = argmax, acc_norm = argmax per byte."""
    model, tok = load_model(model_name, device="cpu"), load_tokenizer(model_name)
    hits = hits_norm = 0
    for doc in docs:
        lls = []
        for choice in doc["choices"]:
            ctx = tok(doc["context"], add_special_tokens=False)["input_ids"]
            whole = tok(doc["context"] + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
            lls.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i].encode()))
        hits += best == doc["label"]
        hits_norm += best_norm == doc["label"]
    return hits / len(docs), hits_norm / len(docs)


def test_custom_task_accuracy_equals_hand_loop(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r.json"
    monkeypatch.setattr("sys.argv", ["bonsai", "eval", "kjv,kjv_cloze", "--model", "tiny", "--include-path", "tests/tasks",
                                      "--limit", "24", "--seqlen", "128", "--max-windows", "2", "--batch-size", "4",
                                      "--json", str(out)])
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None)
    result = json.loads(out.read_text())
    task = result["tasks"]["kjv_cloze"]
    assert task["samples"] == 24 and task["num_fewshot"] in (None, 0)
    docs = [json.loads(line) for line in (ROOT / "tests/tasks/kjv_cloze/kjv_cloze.jsonl").read_text().splitlines()][:24]
    acc, acc_norm = _hand_accuracy("tiny", docs)
    assert task["acc"] == pytest.approx(acc) and task["acc_norm"] == pytest.approx(acc_norm)
    assert task["acc"] > 0.25 + 0.1  # well above chance: the metric means something
    assert task["acc_stderr"] > 0 and result["perplexity"]["kjv"]["windows"] == 2
