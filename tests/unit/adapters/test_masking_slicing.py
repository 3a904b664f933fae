"""Masked sub-model == physically sliced model, for every family, attention kernel and padding."""

import pytest
import torch
from helpers import FAMILIES, tiny_model

from bonsai.adapters import ATTENTION, GroupKey, get_adapter
from bonsai.engine.masks import UnitMasks
from bonsai.errors import BonsaiError

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
    if ATTENTION not in adapter.unprunable:
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


def test_heads_that_cannot_be_sliced_exactly_are_refused():
    """OLMo-2's q/k norm spans all heads: slicing a head changes the others, so attention is refused."""
    model = tiny_model("olmo2", "eager")
    adapter = get_adapter(model)
    assert {k.kind for k in adapter.groups()} == {"mlp"}
    with pytest.raises(BonsaiError, match="--units mlp"):
        adapter.check_kinds(("attention", "mlp"))
    adapter.check_kinds(("mlp",))
    # the reason is real: zeroing a head's output is not the same function as removing its rows
    ids = torch.randint(0, 97, (1, 12))
    attn = adapter.attention(0)
    with torch.no_grad():
        masked_model = tiny_model("olmo2", "eager")
        with UnitMasks(get_adapter(masked_model), groups=[GroupKey(0, ATTENTION)]) as um:
            um.set({GroupKey(0, ATTENTION): torch.tensor([1.0, 1.0, 1.0, 0.0])})
            masked = masked_model(ids).logits
        keep = torch.arange(3)
        from bonsai.adapters.base import _expand, _slice_linear

        for lin in (attn.q, attn.k, attn.v):
            _slice_linear(lin, _expand(keep, attn.head_dim), 0)
        _slice_linear(attn.out, _expand(keep, attn.head_dim), 1)
        attn.module.q_norm.weight.data = attn.module.q_norm.weight.data[: 3 * attn.head_dim]
        attn.module.k_norm.weight.data = attn.module.k_norm.weight.data[: 3 * attn.head_dim]
        attn.module.config.num_attention_heads = attn.module.config.num_key_value_heads = 3
        assert not torch.allclose(model(ids).logits, masked, atol=1e-4)


def test_unsupported_architecture():
    import transformers

    from bonsai.adapters import get_adapter as ga

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(BonsaiError, match="unsupported architecture 'gpt2'.*llama"):
        ga(model)
