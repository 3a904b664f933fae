"""Device, dtype and threading choices shared by every command."""

from __future__ import annotations

import os
import socket

import torch

from bonsai.errors import BonsaiError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure_threads() -> None:
    """Avoid OpenMP spin-waiting, which made 2-thread CPU forwards 8-14x slower on a loaded machine.

    Only sets the variable when the user has not; it must happen before torch starts its pool.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BonsaiError(f"--device {device} was asked for but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise BonsaiError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
    """`auto` means float32 on CPU (half-precision matmuls are slow and inexact there) and the
    checkpoint's own half precision on a GPU (bfloat16 for float32 checkpoints)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise BonsaiError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16


def peak_memory(device: torch.device) -> int:
    """Peak memory so far: max allocated on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def current_memory(device: torch.device) -> int:
    """Memory held now: allocated on a GPU, the process's resident memory on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_memory(device)


def release_memory() -> None:
    """Give freed memory back to the system. glibc keeps what a process frees (tokenising a long text leaves
    400 MB behind, a phase's temporaries more), so each later phase would start that much higher; on Linux
    `malloc_trim` returns it. A no-op where there is no glibc."""
    import gc

    gc.collect()
    c = libc()
    if c is not None:
        c.malloc_trim(0)


_LIBC = None


def libc():
    """The C library with the two calls bonsai makes into it (`malloc_trim`, `madvise`), loaded once; None where
    there is no glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6", use_errno=True)
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC = lib
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak (`peak_memory` then reports the peak since this call); False where it cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM, ru_maxrss)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        # some kernels (and sandboxes) accept the write and keep the old peak
        return peak_memory(device) <= current_memory(device) + 64 * 2**20
    except OSError:
        return False


class PhasePeaks:
    """Peak memory of each phase of a run (the statistics, the sub-models, the refit ...) and of the whole run.

    Each phase starts a new peak, so the run's own peak is the largest phase peak (and whatever came before the
    first phase: loading the model)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.overall = peak_memory(device)
        self.phases: dict[str, int] = {}
        self.held = current_memory(device)
        self.exact = True  # each phase's own peak; False once a reset failed (then a phase holds the run's peak so far)

    def start(self) -> None:
        self.overall = max(self.overall, peak_memory(self.device))
        release_memory()  # a phase starts from what the run holds, not from what the last one freed
        self.exact = reset_peak_memory(self.device) and self.exact
        self.held = current_memory(self.device)  # what the run holds as the phase starts

    def end(self, name: str) -> int:
        """Record the peak since `start` under `name` (the larger, when a phase runs twice) and return it."""
        value = peak_memory(self.device)
        self.phases[name] = max(self.phases.get(name, 0), value)
        self.overall = max(self.overall, value)
        return value

    def peak(self) -> int:
        return max(self.overall, peak_memory(self.device))


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """A quick check so that offline users get an answer at once instead of a retry loop."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False
