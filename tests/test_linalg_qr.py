"""svdkit.core.linalg_qr against the definitions: W P = Q R, orthonormal Q, triangular R, the sign convention,
and the greedy pivot order of a column-pivoted QR (recomputed by Gram–Schmidt in fp64)."""

from __future__ import annotations

import pytest
import torch

from svdkit.core.linalg_qr import pivoted_qr, qr_positive


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gram_schmidt(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram–Schmidt, projected twice, in fp64: the unique QR with diag(R) > 0 of a full-rank X."""
    m, k = X.shape
    Q, R = torch.zeros(m, k, dtype=X.dtype), torch.zeros(k, k, dtype=X.dtype)
    for j in range(k):
        v = X[:, j].clone()
        for _ in range(2):
            c = Q[:, :j].T @ v
            v -= Q[:, :j] @ c
            R[:j, j] += c
        R[j, j] = v.norm()
        Q[:, j] = v / R[j, j]
    return Q, R


def greedy_pivots(W: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """The pivot order and |R_jj| of a column-pivoted QR: at step j, the column of largest residual norm."""
    Q = W.new_zeros(W.shape[0], 0)
    order, diag = [], []
    for _ in range(min(W.shape)):
        res = W - Q @ (Q.T @ W)
        res = res - Q @ (Q.T @ res)
        norms = res.norm(dim=0)
        norms[order] = -1.0  # chosen columns are spent
        j = int(norms.argmax())
        order.append(j)
        diag.append(float(norms[j]))
        Q = torch.cat([Q, (res[:, j] / norms[j])[:, None]], 1)
    return order, torch.tensor(diag, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(9, 5), (6, 6)])
def test_qr_positive_is_the_unique_gram_schmidt_qr(shape):
    X = randn(*shape)
    Q, R = qr_positive(X)
    Qg, Rg = gram_schmidt(X)
    torch.testing.assert_close(Q, Qg, atol=1e-10, rtol=0)
    torch.testing.assert_close(R, Rg, atol=1e-10, rtol=0)
    assert torch.all(R.diagonal() >= 0) and torch.equal(R, torch.triu(R))


def test_qr_positive_batched_matches_each_matrix():
    X = randn(2, 3, 7, 4, seed=1)
    Q, R = qr_positive(X)
    assert Q.shape == (2, 3, 7, 4) and R.shape == (2, 3, 4, 4)
    for i in range(2):
        for j in range(3):
            Qg, Rg = gram_schmidt(X[i, j])
            torch.testing.assert_close(Q[i, j], Qg, atol=1e-10, rtol=0)
            torch.testing.assert_close(R[i, j], Rg, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", [(10, 6), (6, 10)])
def test_pivoted_qr_definition_and_greedy_pivots(shape):
    W = randn(*shape, seed=2)
    Q, R, perm = pivoted_qr(W, torch.float64)
    k = min(shape)
    assert Q.shape == (shape[0], k) and R.shape == (k, shape[1]) and perm.dtype == torch.int64
    torch.testing.assert_close(W[:, perm], Q @ R)  # W P = Q R
    torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=W.dtype))
    assert torch.equal(R, torch.triu(R)) and torch.all(R.diagonal() >= 0)
    order, diag = greedy_pivots(W)
    assert perm[:k].tolist() == order
    torch.testing.assert_close(R.diagonal(), diag, atol=1e-10, rtol=1e-8)
    A = torch.empty_like(R).index_copy_(1, perm, R)  # R Pᵀ: W = Q (R Pᵀ)
    torch.testing.assert_close(Q @ A, W)


def test_pivoted_qr_rank_deficient_ends_in_zeros_and_refuses_vectors():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 6, generator=g, dtype=torch.float64)
    Q, R, perm = pivoted_qr(W, torch.float64)
    assert float(R.diagonal()[2:].abs().max()) < 1e-12 * float(R[0, 0])
    torch.testing.assert_close(W[:, perm], Q @ R)
    with pytest.raises(ValueError, match="pivoted_qr expects a matrix"):
        pivoted_qr(torch.ones(3))
