import json
import math
import sys

import pytest
import torch

from bonsai.cli import main
from bonsai.models.aliases import TINY_MODEL_DIR

pytestmark = pytest.mark.integration


def test_eval_json_matches_transformers_loss(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (TINY_MODEL_DIR.parent / "kjv").joinpath("README.md").read_text() * 3
    data = tmp_path / "d.txt"
    data.write_text(text)
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["bonsai", "eval", str(data), "--model", "tiny", "--seqlen", "64",
                                      "--batch-size", "3", "--json", str(out)])
    main()
    result = json.loads(out.read_text())
    assert {"ppl", "dataset", "split", "seqlen", "tokens", "windows", "dtype", "params"} <= set(result)
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // 64
    with torch.no_grad():  # transformers' own mean loss, one window at a time
        losses = [model(ids[i * 64:(i + 1) * 64][None], labels=ids[i * 64:(i + 1) * 64][None]).loss.item()
                  for i in range(n)]
    assert result["windows"] == n and result["tokens"] == n * 64 and result["seqlen"] == 64
    assert result["ppl"] == pytest.approx(math.exp(sum(losses) / n), rel=1e-4)
    assert "ppl" in capsys.readouterr().out


def test_models_lists_aliases(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bonsai", "models"])
    main()
    out = capsys.readouterr().out
    assert "llama-2-7b" in out and "meta-llama/Llama-2-7b-hf" in out and "phi" in out
