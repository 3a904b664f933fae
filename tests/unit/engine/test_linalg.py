import pytest
import torch

import bonsai.engine.linalg as linalg
from bonsai.engine.obs import damped_inverse


def spd(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n + 40, n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return x.T @ x + 0.1 * n * torch.eye(n, dtype=dtype)


@pytest.fixture
def in_place(monkeypatch):
    """Every matrix through LAPACK in its own memory (in real runs only those past IN_PLACE_BYTES)."""
    monkeypatch.setattr(linalg, "IN_PLACE_BYTES", 0)
    monkeypatch.setattr(linalg, "ROW_BLOCK", 48)  # several row blocks and a ragged last one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factor_and_inverse_in_place_equal_torchs(in_place, dtype):
    g = spd(203, dtype)
    a = g.clone()
    pointer = a.data_ptr()
    assert linalg.cholesky_(a)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(a, torch.linalg.cholesky(g), rtol=tol, atol=tol * float(g.diagonal().max()) ** 0.5)
    inv = linalg.cholesky_inverse_(a)
    assert inv.data_ptr() == pointer and torch.equal(inv, inv.T)  # its own memory, symmetric to the bit
    torch.testing.assert_close(inv @ g, torch.eye(203, dtype=dtype), rtol=0, atol=100 * tol)


def test_a_matrix_that_is_not_positive_definite_is_said_so(in_place):
    a = spd(64, torch.float64)
    a[5, 5] = -1.0
    assert not linalg.cholesky_(a)


def test_mirror_copies_the_lower_triangle_exactly(in_place):
    a = torch.randn(130, 130, dtype=torch.float64)
    expect = a.tril() + a.tril(-1).T
    linalg.mirror_lower_(a)
    assert torch.equal(a, expect)


def test_damped_inverse_is_the_same_through_either_path(monkeypatch):
    g = spd(150, torch.float64, seed=3)
    torch_path = damped_inverse(g, 0.01)
    monkeypatch.setattr(linalg, "IN_PLACE_BYTES", 0)
    torch.testing.assert_close(damped_inverse(g, 0.01), torch_path, rtol=1e-10, atol=1e-14)


def test_the_refit_is_the_same_through_either_path(monkeypatch):
    from bonsai.engine.refit import refit_projection

    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 96, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(32, 96, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    keep = torch.arange(0, 96, 3)
    args = (weight, bias, x.T @ x, x.sum(0), 400, keep, "lstsq")
    torch_path = refit_projection(*args)
    monkeypatch.setattr(linalg, "IN_PLACE_BYTES", 0)
    lapack_path = refit_projection(*args)
    torch.testing.assert_close(lapack_path.weight, torch_path.weight, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lapack_path.bias, torch_path.bias, rtol=1e-9, atol=1e-12)
    assert lapack_path.error_refit == pytest.approx(torch_path.error_refit, rel=1e-9)
