"""Forward passes that start at block i, for sub-models that equal the current model before block i.

A probe sub-model drops units of one layer only, so its first i blocks compute exactly what the current
model computes. `BlockPrefix` keeps the current model's hidden states entering one block for every
calibration window and advances them block by block; a sub-model whose first dropped unit is in block i then
runs the model's own forward with blocks 0..i-1 passed through and block i's input replaced by the kept
states. Embeddings, position embeddings, masks, the final norm, the head and any soft-capping stay the
model's own (no module name beyond the adapter's `layers()` is used). A probe of layer i costs the blocks
from i on plus the head: on average a little over half a forward, instead of a whole one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from bonsai.engine.blocks import blocks_passed_through, capture_block_inputs, run_block


class BlockPrefix:
    """The current model's input to block `layer` for every window (one tensor, windows x seq x hidden, in the
    model's dtype on its first device): one block's activations more than a plain forward keeps."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int):
        self.model, self.layers, self.windows, self.batch_size = model, layers, windows, batch_size
        self._restart()

    def _restart(self) -> None:
        inputs = capture_block_inputs(self.model, self.layers, self.windows, self.batch_size)
        self.hidden = torch.cat(inputs.hidden)
        self.inputs = inputs  # each block's keyword arguments per batch of `batch_size` consecutive windows
        self.layer = 0

    @torch.no_grad()
    def advance(self, layer: int) -> None:
        """Move the states to block `layer`'s input through the model as it is (the caller switches any
        sub-model masks off first). Going back restarts from the embeddings."""
        if layer < self.layer:
            self._restart()
        for j in range(self.layer, layer):
            for b, kwargs in enumerate(self.inputs.kwargs_for(self.layers[j])):
                rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
                self.hidden[rows] = run_block(self.layers[j], self.hidden[rows], kwargs)
        self.layer = layer

    @contextmanager
    def start_here(self, windows: torch.Tensor) -> Iterator[None]:
        """Within the block, a forward on these windows' tokens skips blocks 0..layer-1 and feeds block
        `layer` the kept states of those windows (rows in the batch's order)."""
        layer = self.layer
        states = self.hidden[windows.to(self.hidden.device)]

        def inject(module, args, kwargs):
            if args:
                return (states.to(args[0].device), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": states.to(kwargs["hidden_states"].device)}

        handle = self.layers[layer].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            with blocks_passed_through(self.layers, range(layer)):
                yield
        finally:
            handle.remove()


def first_changed_layer(masks: dict, sample: int, num_layers: int) -> int:
    """The first layer where sub-model `sample` drops a unit (`masks`: group -> (samples, units) 0/1 keep);
    the last layer when it drops none (the model itself: only the head is left to run)."""
    layers = [key.layer for key, m in masks.items() if bool((m[sample] == 0).any())]
    return min(layers) if layers else num_layers - 1
