"""The teacher cache holds the teacher's own top-k, and is reused only for the same teacher, data and k."""

import pytest
import torch

from bonsai.engine.divergence import teacher_topk, topk_kl
from bonsai.finetune.teacher_cache import find_or_build
from bonsai.models.loading import load_model

pytestmark = pytest.mark.unit


def test_cache_matches_online_teacher_and_is_reused(random_checkpoints, tmp_path):
    teacher = str(random_checkpoints["llama"])
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 4000, (70, 16), generator=g)  # 70 windows: two shards, the second partial
    cache, info = find_or_build(teacher, windows, 8, tmp_path, batch_size=16, dtype="float32", device="cpu")
    assert not info["reused"] and cache.windows == 70 and info["bytes"] > 0

    model = load_model(teacher, dtype="float32", device="cpu")
    rows = [3, 69, 64, 0]
    with torch.no_grad():
        online = model(windows[rows]).logits
    ref = teacher_topk(online, 8)
    got = cache.get(rows)
    assert torch.equal(got.ids, ref.ids)
    torch.testing.assert_close(got.logprobs.float(), ref.logprobs, atol=2e-2, rtol=2e-3)  # fp16 storage
    torch.testing.assert_close(got.tail, ref.tail)
    # the KL against the cache equals the KL computed online on the same support
    student = torch.randn_like(online)
    torch.testing.assert_close(topk_kl(student, got), topk_kl(student, ref), atol=2e-3, rtol=2e-3)

    again, info2 = find_or_build(teacher, windows, 8, tmp_path, batch_size=16, dtype="float32", device="cpu")
    assert info2["reused"] and again.path == cache.path
    _, other_k = find_or_build(teacher, windows, 4, tmp_path, batch_size=16, dtype="float32", device="cpu")
    _, other_data = find_or_build(teacher, windows[:10], 8, tmp_path, batch_size=16, dtype="float32", device="cpu")
    assert len({info["path"], other_k["path"], other_data["path"]}) == 3 and not other_k["reused"]
