"""Masked sub-model == physically sliced model, for every family, attention kernel and padding."""

import pytest
import torch
from helpers import FAMILIES, tiny_model

from bonsai.adapters import ATTENTION, GroupKey, get_adapter
from bonsai.errors import BonsaiError
from bonsai.masking import UnitMasks

pytestmark = pytest.mark.unit


def random_masks(adapter, seed):
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for key in adapter.groups():
        n = adapter.group_size(key)
        keep_count = int(torch.randint(0, n + 1, (1,), generator=g))  # different counts per layer, 0 allowed
        mask = torch.zeros(n)
        mask[torch.randperm(n, generator=g)[:keep_count]] = 1
        masks[key] = mask
    masks[GroupKey(1, ATTENTION)] = torch.zeros(adapter.group_size(GroupKey(1, ATTENTION)))  # a layer loses all heads
    return masks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_masked_equals_sliced(family, attn):
    model = tiny_model(family, attn)
    adapter = get_adapter(model)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    pad = torch.ones_like(ids)
    pad[1, :7] = 0  # left padding in one row
    for seed in range(2):
        masks = random_masks(adapter, seed)
        with UnitMasks(adapter) as um, torch.no_grad():
            um.set(masks)
            masked = model(ids, attention_mask=pad).logits
        sliced_model = tiny_model(family, attn)
        sliced = get_adapter(sliced_model)
        for key, mask in masks.items():
            sliced.slice(key, torch.nonzero(mask).flatten())
        with torch.no_grad():
            out = sliced_model(ids, attention_mask=pad).logits
        valid = pad.bool()
        torch.testing.assert_close(out[valid], masked[valid], atol=1e-5, rtol=0)
        # the sliced model really is smaller, and generation works on it
        assert sum(p.numel() for p in sliced_model.parameters()) < sum(p.numel() for p in model.parameters())
        gen = sliced_model.generate(ids[:1], attention_mask=pad[:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert gen.shape == (1, 24)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_masks_match_separate_forwards(family):
    model = tiny_model(family, "sdpa")
    adapter = get_adapter(model)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    m0, m1 = random_masks(adapter, 0), random_masks(adapter, 1)
    with UnitMasks(adapter) as um, torch.no_grad():
        um.set({k: torch.stack([m0[k], m1[k]]) for k in m0})
        both = model(ids).logits
        um.set(m0)
        first = model(ids[:1]).logits
        um.set(m1)
        second = model(ids[1:]).logits
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=0)


def test_masks_are_removable():
    model = tiny_model("llama", "sdpa")
    adapter = get_adapter(model)
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
        with UnitMasks(adapter) as um:
            um.set(random_masks(adapter, 0))
            assert not torch.allclose(model(ids).logits, before)
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_params_per_unit_are_exact(family):
    """Removing units changes the parameter count by exactly units x params_per_unit."""
    model = tiny_model(family, "sdpa")
    adapter = get_adapter(model)
    for key in adapter.groups():
        per_unit = adapter.params_per_unit(key)
        before = sum(p.numel() for p in model.parameters())
        n = adapter.group_size(key)
        adapter.slice(key, torch.arange(n - 1))
        assert before - sum(p.numel() for p in model.parameters()) == per_unit


def test_gqa_unit_is_a_kv_group():
    model = tiny_model("llama-gqa", "eager")
    adapter = get_adapter(model)
    key = GroupKey(0, ATTENTION)
    assert adapter.group_size(key) == 2  # 8 query heads over 2 key/value heads
    adapter.slice(key, torch.tensor([1]))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 8 and attn.k_proj.out_features == 8
    assert attn.num_key_value_groups == 4


def test_unsupported_architecture():
    import transformers

    from bonsai.adapters import get_adapter as ga

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(BonsaiError, match="unsupported architecture 'gpt2'.*llama"):
        ga(model)
