"""Block-by-block execution reproduces the model's own forward, block by block, in every family."""

import pytest
import torch
from helpers import FAMILIES, tiny_model

from bonsai.adapters import get_adapter
from bonsai.baselines.layerwise import block_outputs, capture_block_inputs

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
