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


# ---- BOS protocol: windows start as the family is run -------------------------------------------------------
def test_bos_follows_the_tokenizer(tiny_tokenizer):
    from helpers import bos_adding

    from bonsai.data import resolve_bos

    adding = bos_adding(tiny_tokenizer)
    assert resolve_bos(tiny_tokenizer, "auto") is None  # has a BOS token, does not add it (like SmolLM2)
    assert resolve_bos(adding, "auto") == adding.bos_token_id  # adds it (like Gemma, LLaMA)
    assert resolve_bos(tiny_tokenizer, "always") == tiny_tokenizer.bos_token_id
    assert resolve_bos(adding, "never") is None
    with pytest.raises(BonsaiError, match="unknown --bos"):
        resolve_bos(adding, "sometimes")


def test_always_without_a_bos_token_is_refused(tiny_tokenizer):
    import copy

    from bonsai.data import resolve_bos

    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = None
    assert resolve_bos(tok, "auto") is None
    with pytest.raises(BonsaiError, match="no BOS token"):
        resolve_bos(tok, "always")


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_calibration_window_starts_with_bos_exactly_when_expected(tiny_tokenizer, mode):
    from helpers import bos_adding

    from bonsai.data import resolve_bos

    adding = bos_adding(tiny_tokenizer)
    bos = resolve_bos(adding, mode)
    windows = calibration_windows(adding, "kjv", 6, 32, seed=3, bos=bos)
    assert windows.shape == (6, 32)
    text = tiny_tokenizer(load_text("kjv", "train").text, add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, text))
    if mode == "auto":
        assert (windows[:, 0] == adding.bos_token_id).all()
        assert not (windows[:, 1:] == adding.bos_token_id).any()
        body = windows[:, 1:]
    else:
        assert not (windows == adding.bos_token_id).any()
        body = windows
    for row in body.tolist():  # the rest is one contiguous piece of the training text
        assert " ".join(map(str, row)) in joined


def test_eval_windows_with_bos_cover_the_text_in_order(tiny_tokenizer, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("In the beginning God created the heaven and the earth. " * 40)
    bos = tiny_tokenizer.bos_token_id
    windows, _ = eval_windows(tiny_tokenizer, str(f), 16, bos=bos)
    ids = tiny_tokenizer(f.read_text(), add_special_tokens=False)["input_ids"]
    assert windows.shape == (len(ids) // 15, 16)
    assert (windows[:, 0] == bos).all()
    assert windows[:, 1:].flatten().tolist() == ids[: windows.shape[0] * 15]


def test_eval_without_bos_tokenises_the_joined_text_as_published(tiny_tokenizer, tmp_path):
    """--bos never: the Wanda/SparseGPT protocol tokenises the joined text once with the tokenizer's own special
    tokens, so a BOS-adding family has a BOS at the start of the first window only."""
    from helpers import bos_adding

    adding = bos_adding(tiny_tokenizer)
    f = tmp_path / "t.txt"
    f.write_text("And God said, Let there be light: and there was light. " * 40)
    windows, _ = eval_windows(adding, str(f), 16, bos=None)
    ids = adding(f.read_text())["input_ids"]
    assert ids[0] == adding.bos_token_id
    assert windows.flatten().tolist() == ids[: windows.numel()]
    assert (windows[1:] != adding.bos_token_id).all()


def test_a_mixture_draws_from_each_text_in_turn(tiny_tokenizer):
    """--calib kjv+austen: windows alternate between the texts, each drawn as that text alone would be drawn."""
    mixed = calibration_windows(tiny_tokenizer, "kjv+austen", 5, 24, seed=2)
    kjv = calibration_windows(tiny_tokenizer, "kjv", 3, 24, seed=2 * 1009)
    austen = calibration_windows(tiny_tokenizer, "austen", 2, 24, seed=2 * 1009 + 1)
    assert torch.equal(mixed, torch.stack([kjv[0], austen[0], kjv[1], austen[1], kjv[2]]))
