"""Block-by-block execution reproduces the model's own forward, block by block, in every family."""

import pytest
import torch
from helpers import FAMILIES, tiny_model

from bonsai.adapters import ATTENTION, MLP, GroupKey, get_adapter
from bonsai.engine.blocks import block_outputs, block_statistics, capture_block_inputs
from bonsai.engine.spill import HOST_STATES_SHARE, SpilledTensor, SpillStore, stash, states_store
from bonsai.engine.statistics import GramStats

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_run_one_by_one_give_the_models_hidden_states(family):
    """Windows longer than the tiny Gemma models' sliding window (6): their global layers get another mask
    (and Gemma-3 another rotary embedding) than their sliding ones, which a single set of block arguments
    would get wrong."""
    model = tiny_model(family).double()
    layers = get_adapter(model).layers()
    windows = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(windows, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    inputs = capture_block_inputs(model, layers, windows, batch_size=2)
    torch.testing.assert_close(torch.cat(inputs.hidden), want[0], rtol=0, atol=0)
    for i, block in enumerate(layers[:-1]):  # the last entry of hidden_states has the final norm applied
        inputs.hidden = block_outputs(block, inputs)
        torch.testing.assert_close(torch.cat(inputs.hidden), want[i + 1], rtol=1e-12, atol=1e-12)
    assert all(type(b).__name__.endswith("DecoderLayer") for b in layers)  # the blocks are back in place


def test_block_states_wait_in_host_memory_only_on_an_accelerator_and_when_large():
    """On the CPU they stay put; on an accelerator (a meta-device model stands in: no memory, real sizes) they
    leave once a block's input and output copies pass HOST_STATES_SHARE of the model's own bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model_bytes = 2 * sum(p.numel() for p in model.parameters())
    limit = HOST_STATES_SHARE * model_bytes / (2 * 256 * 2)  # tokens at which two bf16 copies reach the share
    assert states_store(model, int(limit) - 1) is None
    assert states_store(model, int(limit) + 1) == torch.device("cpu")
    cpu = tiny_model("llama")  # on the CPU, host memory is the memory: large states go to a temporary file
    assert states_store(cpu, 8) is None
    assert isinstance(states_store(cpu, 10**9), SpillStore)


def test_spilled_states_come_back_bit_for_bit_and_their_files_go():
    import os

    store = SpillStore()
    tensors = [torch.randn(3, 5, 7).to(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float64)]
    spilled = [stash(t, store) for t in tensors]
    assert all(isinstance(s, SpilledTensor) for s in spilled) and len(os.listdir(store.directory)) == 3
    for t, s in zip(tensors, spilled, strict=True):
        assert torch.equal(s.to("cpu"), t) and s.to(torch.float64).dtype == torch.float64 and s.shape == t.shape
    del spilled, s
    assert os.listdir(store.directory) == []
    directory = store.directory
    del store
    assert not os.path.exists(directory)


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_pass_stops_where_its_projections_have_their_inputs(family):
    """Stopped after the attention's output projection, a batch never reaches the MLP's, and the Gram matrix
    is the one a full block forward gives; with both projections it equals the full pass for both."""
    model = tiny_model(family).double()
    adapter = get_adapter(model)
    windows = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(1))
    inputs = capture_block_inputs(model, adapter.layers(), windows, batch_size=2)
    block = adapter.layers()[0]
    attn, mlp = adapter.output_projection(GroupKey(0, ATTENTION)), adapter.output_projection(GroupKey(0, MLP))
    with GramStats({"attn": attn, "mlp": mlp}) as full:
        block_outputs(block, inputs)
    calls = []
    counter = mlp.register_forward_pre_hook(lambda module, args: calls.append(1))
    with GramStats({"attn": attn}) as early:
        block_statistics(block, inputs, [attn])
    counter.remove()
    assert calls == []  # the MLP's output projection never ran
    assert early.tokens["attn"] == full.tokens["attn"] == windows.numel()
    torch.testing.assert_close(early.gram["attn"], full.gram["attn"], rtol=0, atol=0)
    with GramStats({"attn": attn, "mlp": mlp}) as both:
        block_statistics(block, inputs, [attn, mlp])
    for key in ("attn", "mlp"):
        torch.testing.assert_close(both.gram[key], full.gram[key], rtol=0, atol=0)
        torch.testing.assert_close(both.sum[key], full.sum[key], rtol=0, atol=0)
