"""`bonsai bench`: JSON layout with speedup per setting, and refusal of a baseline with another tokenizer."""

import json

import pytest

from bonsai.cli import main

pytestmark = pytest.mark.integration


def run(monkeypatch, capsys, *args):
    monkeypatch.setattr("sys.argv", ["bonsai", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr()


def test_bench_json_has_speedup_per_setting(monkeypatch, capsys, tmp_path, random_checkpoints):
    out = tmp_path / "b.json"
    src = str(random_checkpoints["llama"])
    code, _ = run(monkeypatch, capsys, "bench", "--model", src, "--baseline", "tiny", "--seqlen", "32", "--batch-sizes",
                  "1,2", "--generate-tokens", "4", "--repeats", "1", "--device", "cpu", "--json", str(out))
    assert code == 0
    r = json.loads(out.read_text())
    assert set(r["speedup"]) == {"forward_b1", "forward_b2", "generate_b1", "generate_b2"}
    for row in r["results"]:
        assert row["speedup"] == pytest.approx(row["forward_seconds_baseline"] / row["forward_seconds_model"])
    assert r["param_ratio"] == pytest.approx(r["models"]["model"]["params"] / r["models"]["baseline"]["params"])


def test_bench_refuses_a_baseline_with_another_tokenizer(monkeypatch, capsys, tmp_path, random_checkpoints, tiny_tokenizer):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(random_checkpoints["llama"], other)
    tok = tiny_tokenizer.__class__.from_pretrained(str(other))
    tok.add_tokens(["<bonsai-extra>"])
    tok.save_pretrained(other)
    code, captured = run(monkeypatch, capsys, "bench", "--model", "tiny", "--baseline", str(other), "--device", "cpu")
    assert code == 2 and "different tokenizers" in captured.err and len(captured.err.strip().splitlines()) == 1
