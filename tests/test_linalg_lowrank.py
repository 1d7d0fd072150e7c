"""svdkit.core.linalg_lowrank against dense SVDs: the factored SVD of B·A and the Eckart–Young truncation error."""

from __future__ import annotations

import pytest
import torch

from svdkit.core.linalg import svd_exact
from svdkit.core.linalg_lowrank import factored_svd, numerical_rank, truncation_error


@pytest.mark.parametrize("m,k,n", [(20, 5, 12), (8, 6, 30), (10, 12, 9)])
def test_factored_svd_is_the_svd_of_the_product(m, k, n):
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    U, S, Vh = factored_svd(B.double(), A.double())
    M = B.double() @ A.double()
    torch.testing.assert_close(S[: min(m, n, k)], torch.linalg.svdvals(M)[: min(m, n, k)], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, M, atol=1e-10, rtol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-10, rtol=0)
    # sign convention shared with every other SVD in svdkit: the largest |entry| of each u_i is positive
    top = U.abs().argmax(0)
    assert bool((U[top, torch.arange(U.shape[1])] > 0).all())


def test_factored_svd_is_batched_and_keeps_the_dtype():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(3, 7, 4, generator=g), torch.randn(3, 4, 6, generator=g)
    U, S, Vh = factored_svd(B, A)
    assert U.dtype == torch.float32 and U.shape == (3, 7, 4) and Vh.shape == (3, 4, 6)
    for i in range(3):
        torch.testing.assert_close(S[i], torch.linalg.svdvals(B[i] @ A[i])[:4], atol=1e-5, rtol=1e-5)


def test_factored_svd_refuses_mismatched_factors():
    with pytest.raises(ValueError, match="matching k"):
        factored_svd(torch.ones(4, 3), torch.ones(2, 5))


def test_truncation_error_is_the_relative_frobenius_residual_of_the_best_rank_r():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(15, 9, generator=g, dtype=torch.float64)
    U, S, Vh = svd_exact(M, 9, dtype=torch.float64)
    for r in (0, 1, 4, 9):
        Mr = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
        direct = float(torch.linalg.matrix_norm(M - Mr) / torch.linalg.matrix_norm(M))
        assert truncation_error(S, r) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    assert truncation_error(torch.zeros(3), 1) == 0.0


def test_numerical_rank_counts_directions_above_the_tolerance():
    S = torch.tensor([3.0, 1.0, 1e-3, 1e-20], dtype=torch.float64)
    assert numerical_rank(S) == 3
    assert numerical_rank(S, rtol=1e-2) == 2
    assert numerical_rank(torch.zeros(4, dtype=torch.float64)) == 0
