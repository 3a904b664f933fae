"""Where block states and large matrices wait outside the model's memory while a block-by-block pass runs.

A CPU run's memory is the host's, so what does not fit beside the model goes to a temporary file
(`SpillStore`, read back a batch or a block of rows at a time); an accelerator run keeps it in host memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import torch
from torch import nn


def states_store(model: nn.Module, tokens: int, copies: int = 2) -> torch.device | SpillStore | None:
    """Where block-by-block passes over `tokens` calibration tokens keep their hidden states. A block's input and
    output states for the refit's windows can pass a tenth of the model's own memory (LLaMA-2-7B, 86 windows of
    2048: 2 x 1.4 GB beside 13.5 GB; the residual refit keeps six such sets), which breaks the inference-level
    memory bonsai promises. Beyond HOST_STATES_SHARE of the model's memory they wait outside it: in host memory
    when the model is on an accelerator, in a temporary file when it is on the CPU (whose memory is the host's);
    each batch comes back for its block (PCIe or page-cache time, no extra forward). `copies`: state sets alive at
    once (input and output of a block: 2; the residual-target refit: 6, see `reconstruction._refit_to_residual`)."""
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
