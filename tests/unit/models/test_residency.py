"""Loaded weights live in the process's own memory: a sliced layer frees its parent's pages (issue 39, memory)."""

import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bonsai.models import residency
from bonsai.models.aliases import TINY_MODEL_DIR
from bonsai.models.loading import load_model
from bonsai.models.residency import _file_mappings, _in_mapping, own_mapped_weights

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file mappings are read from /proc")


def _resident_kib(path: str) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) >= 6 and head[5] == path
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


@pytest.mark.parametrize("chunk", [64 * 2**20, 3 * 4096 + 8])  # one chunk; many, not page-aligned
def test_a_file_mapped_weight_is_copied_and_its_pages_dropped(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(residency, "COPY_CHUNK_BYTES", chunk)
    path = tmp_path / "weights.bin"
    values = torch.randn(256, 1024)  # 1 MiB: whole pages
    values.numpy().tofile(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=values.numel() * 4)
    mapped = torch.empty(0).set_(storage).view(torch.float32).view(256, 1024)
    model = nn.Linear(1024, 256, bias=False)
    model.weight = nn.Parameter(mapped, requires_grad=False)
    model.weight.sum()  # fault every page in, as a forward pass would
    assert _resident_kib(str(path)) >= 1000
    starts, ends = _file_mappings()
    assert _in_mapping(model.weight.data_ptr(), starts, ends)

    moved = own_mapped_weights(model)

    assert moved == values.numel() * 4
    starts, ends = _file_mappings()
    assert not _in_mapping(model.weight.data_ptr(), starts, ends)
    assert torch.equal(model.weight, values)
    assert _resident_kib(str(path)) < 64  # the file's pages went (the storage may still map it)


def test_loaded_weights_are_not_views_of_the_checkpoint():
    model = load_model(str(TINY_MODEL_DIR), dtype=torch.float32, device="cpu")
    starts, ends = _file_mappings()
    mapped = [n for n, p in model.named_parameters() if _in_mapping(p.data_ptr(), starts, ends)]
    assert mapped == []
    on_disk = {}
    for f in sorted(TINY_MODEL_DIR.glob("*.safetensors")):
        on_disk.update(load_file(f))
    params = dict(model.named_parameters())
    for name, tensor in on_disk.items():
        assert torch.equal(params[name].float(), tensor.float()), name
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_model_in_ordinary_memory_is_left_alone():
    model = nn.Linear(8, 4)
    before = model.weight.data_ptr()
    assert own_mapped_weights(model) == 0
    assert model.weight.data_ptr() == before
