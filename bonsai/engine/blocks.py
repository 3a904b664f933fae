"""Block-by-block execution: the reconstruction, the unit errors, and the layer-wise baselines (Wanda, BESA).

The model's own forward is run with every decoder block passed through, and pre-hooks capture the first
block's hidden states and the keyword arguments the model passes each block (position embeddings, masks
...; they differ between blocks in families with sliding-window layers). Each block can then be run on its
own with its arguments, so only one block's activations (plus the calibration hidden states) are needed at
a time, and no module name beyond the adapter's `layers()` is ever used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bonsai.engine.spill import SpillStore, stash


class _Stop(Exception):
    pass


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., columns) -> (tokens, columns); also for zero columns (an emptied layer), where reshape(-1, 0) fails."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


class PassThrough(nn.Module):
    """Stands in for a block that is not to run: returns its hidden states unchanged (blocks return a tensor in
    transformers 5; tests run every family through it). Other attributes read through to the block."""

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its parameters stay where they are

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextmanager
def blocks_passed_through(layers: nn.ModuleList, indices: range) -> Iterator[None]:
    """Within the block, `layers[j]` for j in `indices` return their input (the modules are put back after)."""
    saved = {j: layers[j] for j in indices}
    try:
        for j, block in saved.items():
            layers[j] = PassThrough(block)
        yield
    finally:
        for j, block in saved.items():
            layers[j] = block


@dataclass
class BlockInputs:
    """Hidden states entering a block, per calibration batch, and the keyword arguments the model passes each
    block, per batch. Blocks can differ in them (Gemma-2/3 and Qwen's sliding layers get another attention
    mask, Gemma-3's another rotary embedding), so they are kept per block: use `kwargs_for(block)`."""

    hidden: list[torch.Tensor]
    block_kwargs: list[list[dict]]  # [block index][batch]
    blocks: list[nn.Module]
    store_device: torch.device | SpillStore | None = None  # where `hidden` waits between blocks (see `states_store`)

    def kwargs_for(self, block: nn.Module) -> list[dict]:
        for i, b in enumerate(self.blocks):
            if b is block:
                return self.block_kwargs[i]
        raise ValueError("not one of the model's blocks")
















class SharedArguments:
    """One object for block arguments that every batch gets alike. Position embeddings, position ids and masks are
    the same for every batch of equal shape (no padding): kept once, not once per batch (Gemma-3's two rotary
    tables are 0.5 MB a batch: 128 MB over the 256 refit windows of its 270M model, a third of its weights'
    share of the budget)."""

    def __init__(self):
        self._seen: dict[str, list] = {}

    def __call__(self, name: str, value):
        if not _comparable(value):
            return value
        for known in self._seen.setdefault(name, []):
            if _same(known, value):
                return known
        self._seen[name].append(value)
        return value


def _comparable(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, tuple) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int,
                         store_device: torch.device | SpillStore | None = None) -> BlockInputs:
    """The first block's input and every block's keyword arguments, per batch of `batch_size` consecutive
    windows: one forward with every block passed through, stopped before the head."""
    device = next(model.parameters()).device
    blocks = list(layers)
    hidden, block_kwargs = [], [[] for _ in blocks]
    shared = SharedArguments()

    def hook(i: int):
        def record(module, args, kw):
            if i == 0:
                x = args[0] if args else kw["hidden_states"]
                hidden.append(stash(x, store_device))
            block_kwargs[i].append({k: shared(k, v) for k, v in kw.items() if k != "hidden_states"})
            if i == len(blocks) - 1:
                raise _Stop
        return record

    with blocks_passed_through(layers, range(len(blocks))):
        handles = [layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in range(len(blocks))]
        try:
            for start in range(0, windows.shape[0], batch_size):
                try:
                    model(windows[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
        finally:
            for h in handles:
                h.remove()
    return BlockInputs(hidden, block_kwargs, blocks, store_device)


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_outputs(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's output for every batch; states kept in host memory go over to the block one batch at a time."""
    return outputs_of(block, inputs.hidden, inputs.kwargs_for(block), inputs.store_device)


@torch.no_grad()
def outputs_of(block: nn.Module, hidden: list, kwargs: list[dict],
               store_device: torch.device | SpillStore | None) -> list:
    """`block` (any copy of one of the model's blocks) on every batch of `hidden`, with that block's `kwargs`."""
    if store_device is None:
        return [run_block(block, h, kw) for h, kw in zip(hidden, kwargs, strict=True)]
    device = next(block.parameters()).device
    return [stash(run_block(block, h.to(device), kw), store_device) for h, kw in zip(hidden, kwargs, strict=True)]


@torch.no_grad()
def block_statistics(block: nn.Module, inputs: BlockInputs, stop_after: Sequence[nn.Module]) -> None:
    """Run the block on every batch only as far as statistics need: a batch stops as soon as every module in
    `stop_after` has been entered, so hooks registered on them before this call (a GramStats) have seen their
    inputs and the rest of the block is never computed. For the refit's attention stage that skips the MLP,
    most of a block's work. A module that does not run in a batch just lets the block finish."""
    entered: set[int] = set()

    def enter(i: int):
        def hook(module, args):
            entered.add(i)
            if len(entered) == len(stop_after):
                raise _Stop
        return hook

    handles = [m.register_forward_pre_hook(enter(i)) for i, m in enumerate(stop_after)]
    device = next(block.parameters()).device
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs_for(block), strict=True):
            entered.clear()
            try:
                run_block(block, h if inputs.store_device is None else h.to(device), kw)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_until(block: nn.Module, hidden: torch.Tensor, kwargs: dict, stop_at: nn.Module) -> None:
    """Run `block` on one batch until `stop_at` is entered (hooks on it registered before this call have seen
    their input); the rest of the block is not computed."""

    def stop(module, args):
        raise _Stop

    handle = stop_at.register_forward_pre_hook(stop)
    try:
        run_block(block, hidden.to(next(block.parameters()).device), kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()


def block_linears(block: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The block's linear layers whose last name component is one of `names` (the adapter's list)."""
    return {n: m for n, m in block.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names and m.weight.numel() > 0}





