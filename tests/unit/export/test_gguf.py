"""GGUF writer: rotary layout, per-layer layout with padding, metadata and tensors read back."""

import numpy as np
import pytest
import torch
from helpers import tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.errors import BonsaiError
from bonsai.export.gguf import write_gguf
from bonsai.export.gguf_llama import _layout_llama
from bonsai.export.gguf_tensors import ZERO_MLP_WIDTH, rotary_permute

pytestmark = pytest.mark.unit
gguf = pytest.importorskip("gguf")


def _rope_half(x, pos, base=10000.0):
    """HF LLaMA rotary (rotate_half): dims i and i + d/2 form a pair."""
    d = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    ang = pos * inv
    cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
    rot = np.concatenate([-x[d // 2:], x[:d // 2]])
    return x * cos + rot * sin


def _rope_adjacent(x, pos, base=10000.0):
    """llama.cpp's NORM rotary: dims 2i and 2i+1 form a pair."""
    d = x.shape[-1]
    out = x.copy()
    for i in range(d // 2):
        theta = pos * base ** (-2 * i / d)
        a, b = x[2 * i], x[2 * i + 1]
        out[2 * i], out[2 * i + 1] = a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)
    return out


def test_rotary_permute_turns_hf_rotary_into_llama_cpp_rotary():
    rng = np.random.default_rng(0)
    n_head, head_dim, d_in = 3, 8, 5
    W = rng.normal(size=(n_head * head_dim, d_in))
    x = rng.normal(size=d_in)
    P = rotary_permute(W, n_head)
    for pos in (0, 3, 11):
        q_hf = (W @ x).reshape(n_head, head_dim)
        q_cpp = (P @ x).reshape(n_head, head_dim)
        for h in range(n_head):
            hf = _rope_half(q_hf[h], pos)
            cpp = _rope_adjacent(q_cpp[h], pos)
            # the same rotated vector, up to the same permutation of its dims: the dot products agree
            k = rng.normal(size=head_dim)
            k_cpp = rotary_permute(k[:, None], 1)[:, 0]
            assert np.dot(hf, _rope_half(k, pos)) == pytest.approx(np.dot(cpp, _rope_adjacent(k_cpp, pos)))


def test_layout_pads_emptied_groups_and_drops_empty_layers():
    model = tiny_model("llama-gqa", num_hidden_layers=4)
    adapter = get_adapter(model)
    adapter.slice(GroupKey(0, ATTENTION), torch.tensor([], dtype=torch.long))  # layer 0: no heads
    adapter.slice(GroupKey(1, MLP), torch.tensor([], dtype=torch.long))  # layer 1: attention only
    adapter.slice(GroupKey(2, ATTENTION), torch.tensor([], dtype=torch.long))  # layer 2: nothing at all
    adapter.slice(GroupKey(2, MLP), torch.tensor([], dtype=torch.long))
    adapter.slice(GroupKey(3, ATTENTION), torch.tensor([1]))  # layer 3: one key/value group of two
    blocks, uniform = _layout_llama(adapter)
    assert not uniform
    assert [b.source for b in blocks] == [0, 1, 3]
    assert (blocks[0].n_head, blocks[0].n_head_kv, blocks[0].dummy_head) == (1, 1, True)
    assert (blocks[1].n_ff, blocks[1].zero_mlp) == (ZERO_MLP_WIDTH, True)
    assert (blocks[2].n_head, blocks[2].n_head_kv, blocks[2].n_ff) == (4, 1, 48)


def _read(path):
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    return meta, {t.name: t for t in reader.tensors}


def test_per_layer_model_is_written_as_deci_with_arrays(tmp_path, tiny_tokenizer):
    model = tiny_model("llama-gqa", vocab_size=len(tiny_tokenizer))
    adapter = get_adapter(model)
    adapter.slice(GroupKey(1, ATTENTION), torch.tensor([0]))
    adapter.slice(GroupKey(2, MLP), torch.arange(0, 48, 3))
    report = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "f32")
    meta, tensors = _read(tmp_path / "m.gguf")
    assert report["architecture"] == meta["general.architecture"] == "deci"
    assert meta["deci.attention.head_count"] == [8, 4, 8] and meta["deci.attention.head_count_kv"] == [2, 1, 2]
    assert meta["deci.feed_forward_length"] == [48, 48, 16]
    assert meta["deci.attention.key_length"] == 8 and meta["deci.rope.dimension_count"] == 8
    assert tensors["blk.1.attn_q.weight"].shape.tolist() == [64, 32]  # ggml order: (in, out)
    assert tensors["blk.2.ffn_down.weight"].shape.tolist() == [16, 64]
    np.testing.assert_allclose(np.asarray(tensors["blk.0.attn_v.weight"].data),
                               adapter.attention(0).v.weight.detach().numpy(), rtol=0, atol=0)
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert len(meta["tokenizer.ggml.tokens"]) == model.config.vocab_size
    assert report["params_written"] == report["model_params"]


def test_uniform_model_is_written_as_its_own_architecture_and_q8_0(tmp_path, tiny_tokenizer):
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer), intermediate_size=64)
    report = write_gguf(model, tiny_tokenizer, tmp_path / "m.gguf", "q8_0")
    meta, tensors = _read(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "llama" and meta["llama.attention.head_count"] == 4
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    deq = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    w = get_adapter(model).mlp(0).inputs[1].weight.detach().numpy()
    assert np.abs(deq - w).max() <= np.abs(w).max() / 127 + 1e-6  # q8_0: within one step of each block's scale
    assert report["tensor_types"]["blk.0.ffn_up.weight"] == "q8_0"


def test_pruned_phi_is_padded_back_to_uniform(tmp_path, tiny_tokenizer):
    model = tiny_model("phi", vocab_size=len(tiny_tokenizer))
    adapter = get_adapter(model)
    adapter.slice(GroupKey(0, ATTENTION), torch.tensor([0, 2]))
    adapter.slice(GroupKey(1, MLP), torch.arange(20))
    report = write_gguf(model, tiny_tokenizer, tmp_path / "p.gguf", "f32")
    meta, tensors = _read(tmp_path / "p.gguf")
    assert meta["general.architecture"] == "phi2" and meta["phi2.feed_forward_length"] == 48
    assert meta["phi2.rope.dimension_count"] == 8  # half of the 16-wide heads rotate
    q = np.asarray(tensors["blk.0.attn_q.weight"].data)
    assert q.shape == (64, 64) and not q[32:].any()  # two kept heads, two zero heads
    assert report["padding_overhead_params"] > 0 and any("zero heads" in p for p in report["padded"])


def test_refusals_are_one_line(tmp_path, tiny_tokenizer):
    from bonsai.export.gguf_vocab import pre_tokenizer_name

    with pytest.raises(BonsaiError, match="no llama.cpp equivalent"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}})
    with pytest.raises(BonsaiError, match="normalizer"):
        pre_tokenizer_name({"normalizer": {"type": "NFC"}, "pre_tokenizer": {"type": "ByteLevel"}})
    model = tiny_model("llama", vocab_size=len(tiny_tokenizer))
    with pytest.raises(BonsaiError, match="--dtype"):
        write_gguf(model, tiny_tokenizer, tmp_path / "x.gguf", "q4_0")
    assert not (tmp_path / "x.gguf").exists()
