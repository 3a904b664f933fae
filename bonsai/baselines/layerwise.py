"""Block-by-block execution: the reconstruction, the unit errors, and the layer-wise baselines (Wanda, BESA).

The model's own forward is run with every decoder block passed through, and pre-hooks capture the first
block's hidden states and the keyword arguments the model passes each block (position embeddings, masks
...; they differ between blocks in families with sliding-window layers). Each block can then be run on its
own with its arguments, so only one block's activations (plus the calibration hidden states) are needed at
a time, and no module name beyond the adapter's `layers()` is ever used.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bonsai.hooks import PreHooks


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


def states_store(model: nn.Module, tokens: int, copies: int = 2) -> torch.device | SpillStore | None:
    """Where block-by-block passes over `tokens` calibration tokens keep their hidden states. A block's input and
    output states for the refit's windows can pass a tenth of the model's own memory (LLaMA-2-7B, 86 windows of
    2048: 2 x 1.4 GB beside 13.5 GB; the residual refit keeps six such sets), which breaks the inference-level
    memory bonsai promises. Beyond HOST_STATES_SHARE of the model's memory they wait outside it: in host memory
    when the model is on an accelerator, in a temporary file when it is on the CPU (whose memory is the host's);
    each batch comes back for its block (PCIe or page-cache time, no extra forward). `copies`: state sets alive at
    once (input and output of a block: 2; the residual-target refit: 6, see `reconstruct._refit_to_residual`)."""
    param = next(model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    states_bytes = copies * tokens * model.config.hidden_size * param.element_size()
    if states_bytes <= HOST_STATES_SHARE * model_bytes:
        return None
    return torch.device("cpu") if param.device.type != "cpu" else SpillStore()


HOST_STATES_SHARE = 0.05  # of the model's memory: block states beyond it wait outside it (`states_store`)
SPILL_DIR_ENV = "BONSAI_SPILL_DIR"  # where a CPU run's spilled states go (default: the system's temporary folder)


class SpilledTensor:
    """A tensor waiting in a file; `.to(...)` reads it back (as a tensor's `.to` would move it). The file goes when
    the object does."""

    device = torch.device("cpu")  # where it comes back

    def __init__(self, tensor: torch.Tensor, store: SpillStore):
        t = tensor.detach().contiguous().cpu()
        self.shape, self.dtype = t.shape, t.dtype
        self._store = store  # its folder lives as long as any tensor in it
        fd, self.path = tempfile.mkstemp(dir=store.directory, suffix=".bin")
        with os.fdopen(fd, "wb") as f:
            t.view(-1).view(torch.uint8).numpy().tofile(f)
        self.nbytes = t.numel() * t.element_size()
        self._remove = weakref.finalize(self, _unlink, self.path)

    def load(self) -> torch.Tensor:
        buf = bytearray(self.nbytes)
        with open(self.path, "rb") as f:
            f.readinto(buf)
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).view(self.shape)

    def to(self, *args, **kwargs) -> torch.Tensor:
        return self.load().to(*args, **kwargs)

    def columns(self, cols: torch.Tensor, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
        """Columns `cols` of a spilled matrix, read a block of rows at a time: never the whole matrix in memory."""
        rows, width = self.shape
        itemsize = self.nbytes // max(1, rows * width)
        step = max(1, chunk_bytes // max(1, width * itemsize))
        out = torch.empty(rows, len(cols), dtype=self.dtype)
        buf = bytearray(min(rows, step) * width * itemsize)
        with open(self.path, "rb") as f:
            for a in range(0, rows, step):
                b = min(rows, a + step)
                view = memoryview(buf)[: (b - a) * width * itemsize]
                if f.readinto(view) != len(view):
                    raise OSError(f"{self.path}: spilled matrix cut short")
                out[a:b] = torch.frombuffer(view, dtype=torch.uint8).view(self.dtype).view(b - a, width)[:, cols]
        return out

    def __reduce__(self):  # sent to another process (a distributed run) as the tensor itself
        return _same_tensor, (self.load(),)


def _same_tensor(t: torch.Tensor) -> torch.Tensor:
    return t


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class SpillStore:
    """Block states of a CPU run kept in a temporary folder instead of the process's memory (`states_store`)."""

    def __init__(self):
        root = os.environ.get(SPILL_DIR_ENV) or None
        self.directory = tempfile.mkdtemp(prefix="bonsai-states-", dir=root)
        self._remove = weakref.finalize(self, shutil.rmtree, self.directory, True)

    def put(self, tensor: torch.Tensor) -> SpilledTensor | torch.Tensor:
        return SpilledTensor(tensor, self) if tensor.numel() else tensor


def stash(tensor: torch.Tensor, store: torch.device | SpillStore | None):
    """`tensor` kept where `store` says: as it is (None), on a device, or spilled to a file."""
    if store is None:
        return tensor
    if isinstance(store, SpillStore):
        return store.put(tensor)
    return tensor.to(store)


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


class InputNorms(PreHooks):
    """Running sum over tokens of x_j^2 for every input column j of some linears (Wanda's ||X_j||_2^2)."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sq = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
                   for n, m in linears.items()}
        self.tokens = 0
        super().__init__(linears)

    def _hook(self, name: str, module: nn.Linear, args: tuple) -> None:
        x = as_rows(args[0].detach())
        self.sq[name] += x.double().pow(2).sum(0)

    def norms(self) -> dict[str, torch.Tensor]:
        return {n: v.sqrt().float() for n, v in self.sq.items()}



class InputMoments(PreHooks):
    """Per-column sum and sum of squares over tokens at the input of some linears (mean and variance)."""

    def __init__(self, linears: dict):
        self.sum, self.sq, self.tokens = {}, {}, {}
        super().__init__(linears)

    def _hook(self, key, module: nn.Linear, args: tuple) -> None:
        x = as_rows(args[0].detach()).double()
        if key not in self.sum:
            self.sum[key] = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
            self.sq[key] = torch.zeros_like(self.sum[key])
            self.tokens[key] = 0
        self.sum[key] += x.sum(0)
        self.sq[key] += x.pow(2).sum(0)
        self.tokens[key] += x.shape[0]

    def mean(self, key) -> torch.Tensor:
        return self.sum[key] / max(self.tokens[key], 1)

    def variance(self, key) -> torch.Tensor:
        """Population variance of each column over the tokens seen."""
        mean = self.mean(key)
        return (self.sq[key] / max(self.tokens[key], 1) - mean.pow(2)).clamp_min(0)
