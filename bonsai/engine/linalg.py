"""Cholesky factor and inverse of a large symmetric matrix in its own memory.

torch's `cholesky_ex(a, out=(a, info))` and `cholesky_inverse(a, out=a)` compute into a temporary and copy back:
one more n x n matrix at the peak (measured: +1.02-1.06 n^2 each at n = 4,096), which at LLaMA-3-8B's MLP width
(14,336 columns, 784 MiB in float32) is what the unit errors and the refit hold above everything else. On a CPU,
past IN_PLACE_BYTES, LAPACK's potrf/potri run on the tensor's own memory through scipy (whose import costs
~20 MiB, so smaller matrices keep torch's path); elsewhere torch's.
"""

from __future__ import annotations

import torch

IN_PLACE_BYTES = 256 * 2**20  # n x n matrices at least this large are factored in their own memory on a CPU
ROW_BLOCK = 1024  # rows mirrored at a time when a triangle is completed (a block x n temporary)


def _lapack(a: torch.Tensor) -> bool:
    return (a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64) and a.is_contiguous()
            and a.numel() * a.element_size() >= IN_PLACE_BYTES)


def cholesky_(a: torch.Tensor) -> bool:
    """Overwrite the symmetric `a` with its lower Cholesky factor L (a = L L^T; zeros above the diagonal), as
    `torch.linalg.cholesky` would return it. False (and `a` spoiled) when it is not positive definite."""
    if not _lapack(a):
        info = torch.empty((), dtype=torch.int32, device=a.device)
        torch.linalg.cholesky_ex(a, out=(a, info))
        return int(info) == 0
    from scipy.linalg import lapack

    # a's memory read in Fortran order is a^T = a: its upper factor U (a = U^T U) lands in a's lower triangle as
    # U^T = L, and `clean` zeros the rest
    f = a.numpy().T
    potrf = lapack.get_lapack_funcs("potrf", (f,))
    _, info = potrf(f, lower=0, overwrite_a=1, clean=1)
    return info == 0


def cholesky_inverse_(factor: torch.Tensor) -> torch.Tensor:
    """Overwrite the lower Cholesky factor L of a (from `cholesky_`) with a^-1, and return it."""
    if not _lapack(factor):
        return torch.cholesky_inverse(factor, out=factor)
    from scipy.linalg import lapack

    f = factor.numpy().T  # as in `cholesky_`: the factor is f's upper triangle
    potri = lapack.get_lapack_funcs("potri", (f,))
    _, info = potri(f, lower=0, overwrite_c=1)
    if info != 0:
        raise ValueError(f"potri failed ({info})")
    mirror_lower_(factor)
    return factor


def mirror_lower_(a: torch.Tensor) -> None:
    """Copy the lower triangle of the square `a` onto its upper one, ROW_BLOCK rows at a time."""
    n = a.shape[0]
    for start in range(0, n, ROW_BLOCK):
        stop = min(start + ROW_BLOCK, n)
        block = a[start:stop, start:stop]
        block.copy_(block.tril() + block.tril(-1).t())
        if stop < n:  # rows start:stop right of the block are columns start:stop below it (a disjoint region)
            a[start:stop, stop:].copy_(a[stop:, start:stop].t())
