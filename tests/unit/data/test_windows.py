import pytest
import torch

from bonsai.data import calibration_windows, eval_windows, load_text
from bonsai.errors import BonsaiError

pytestmark = pytest.mark.unit


def test_eval_windows_are_non_overlapping_and_drop_remainder(tiny_tokenizer, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("In the beginning God created the heaven and the earth. " * 40)
    windows, data = eval_windows(tiny_tokenizer, str(f), 16)
    ids = tiny_tokenizer(f.read_text(), add_special_tokens=False)["input_ids"]
    assert windows.shape == (len(ids) // 16, 16)
    assert windows.flatten().tolist() == ids[: windows.numel()]


def test_jsonl_and_gz(tiny_tokenizer, tmp_path):
    import gzip
    import json

    f = tmp_path / "d.jsonl.gz"
    with gzip.open(f, "wt") as g:
        for i in range(3):
            g.write(json.dumps({"text": f"document {i} " * 20}) + "\n")
    data = load_text(str(f))
    assert len(data.documents) == 3


def test_calibration_windows_are_seeded_and_from_train(tiny_tokenizer):
    a = calibration_windows(tiny_tokenizer, "kjv", 4, 32, seed=1)
    b = calibration_windows(tiny_tokenizer, "kjv", 4, 32, seed=1)
    c = calibration_windows(tiny_tokenizer, "kjv", 4, 32, seed=2)
    assert a.shape == (4, 32) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("target,message", [
    ("missing.txt", "data file not found"),
    ("nonsense-dataset", "unknown data source"),
])
def test_bad_sources(target, message, tiny_tokenizer):
    with pytest.raises(BonsaiError, match=message):
        eval_windows(tiny_tokenizer, target, 16)


def test_empty_file(tmp_path, tiny_tokenizer):
    f = tmp_path / "empty.txt"
    f.write_text("  \n")
    with pytest.raises(BonsaiError, match="empty"):
        eval_windows(tiny_tokenizer, str(f), 16)


def test_seqlen_too_small(tiny_tokenizer):
    with pytest.raises(BonsaiError, match="at least 2"):
        eval_windows(tiny_tokenizer, "kjv", 1)


def test_unreachable_hub_dataset_fails_fast(tiny_tokenizer, monkeypatch, tmp_path):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    start = time.time()
    with pytest.raises(BonsaiError, match="cannot be reached; pass a local text file"):
        eval_windows(tiny_tokenizer, "wikitext2", 16)
    assert time.time() - start < 15
