"""Weights that live in the process's own memory, not in the checkpoint's file mapping.

transformers maps a safetensors checkpoint into memory (mmap) and, when the dtype matches, hands out tensors that
are views of that one mapping. For inference that is ideal. For pruning it is not: slicing a layer allocates its
smaller weights in anonymous memory, but the parent's pages stay resident in the mapping for as long as any
tensor (the embeddings, the norms) still views it. On SmolLM2-135M in float32 the residual refit's memory grew by
the new weights' size at every block, 275 MiB over the whole model, with the parent's 513 MiB still mapped: the
pruned model cost its parent plus itself.

`own_mapped_weights` copies every CPU tensor that lies in a file mapping into ordinary memory, one tensor at a time,
and tells the kernel to drop the file pages it came from (`madvise(MADV_DONTNEED)`; on a private file mapping the
pages are simply re-read from the file if anything touched them again, so nothing can be lost). The peak while it
runs is the model plus 64 MiB (a tensor is copied a chunk at a time); afterwards a sliced weight frees its parent's
memory as any tensor does. Linux only (elsewhere it does nothing).
"""

from __future__ import annotations

import bisect
import ctypes
import os
import sys

import torch
from torch import nn

from bonsai.runtime import libc

MADV_DONTNEED = 4


def _file_mappings() -> tuple[list[int], list[int]]:
    """Sorted starts and ends of this process's mappings that are backed by a regular file."""
    starts, ends = [], []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/"):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                starts.append(lo)
                ends.append(hi)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    return [starts[i] for i in order], [ends[i] for i in order]


def _in_mapping(address: int, starts: list[int], ends: list[int]) -> bool:
    i = bisect.bisect_right(starts, address) - 1
    return i >= 0 and address < ends[i]


def _drop_pages(address: int, nbytes: int) -> None:
    """Drop the whole pages inside [address, address + nbytes) (the partial pages at either end are left)."""
    page = os.sysconf("SC_PAGE_SIZE")
    lo = -(-address // page) * page
    hi = (address + nbytes) // page * page
    c = libc()
    if hi > lo and c is not None:
        c.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)


COPY_CHUNK_BYTES = 64 * 2**20  # a mapped tensor is copied, and its file pages dropped, this much at a time


def _copied(old: torch.Tensor) -> torch.Tensor:
    """`old` in ordinary memory, its file pages dropped a chunk at a time as it goes: a 2 GB embedding (LLaMA-3's
    128k vocabulary) never has both copies resident."""
    if not old.is_contiguous():
        return old.clone(memory_format=torch.contiguous_format)
    new = torch.empty_like(old, memory_format=torch.contiguous_format)
    src, dst = old.view(-1), new.view(-1)
    size, start, page = old.element_size(), old.data_ptr(), os.sysconf("SC_PAGE_SIZE")
    step = max(1, COPY_CHUNK_BYTES // size)
    dropped = -(-start // page) * page  # whole pages below this address are gone
    for a in range(0, src.numel(), step):
        b = min(src.numel(), a + step)
        dst[a:b].copy_(src[a:b])
        copied = (start + b * size) // page * page  # every whole page below it has been copied
        if copied > dropped:
            _drop_pages(dropped, copied - dropped)
            dropped = copied
    return new


def own_mapped_weights(model: nn.Module) -> int:
    """Copy the model's file-mapped CPU parameters and buffers into ordinary memory and drop their file pages
    (see the module doc). Tied weights stay tied (a shared parameter is one object, copied once). Returns the
    bytes moved."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        starts, ends = _file_mappings()
    except OSError:
        return 0
    moved, seen = 0, set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is None or id(t) in seen or t.device.type != "cpu" or not t.numel():
                    continue
                seen.add(id(t))
                if not _in_mapping(t.data_ptr(), starts, ends):
                    continue
                with torch.no_grad():
                    old = t.data
                    t.data = _copied(old)
                    moved += old.numel() * old.element_size()
                    del old
    return moved
