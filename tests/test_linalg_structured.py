"""svdkit.core.linalg_structured against direct formulas: the Van Loan rearrangement by explicit block loops,
Kronecker sums by torch.kron, Nyström by C W[:r,:r]⁺ R, the Cayley map by (I − K)(I + K)⁻¹, per-head QR and
the per-head SVD of W_o[:, h] W_v[h] by dense products."""

from __future__ import annotations

import pytest
import torch

from svdkit.core import linalg_structured as S


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rearranged_by_loops(W: torch.Tensor, m1: int, n1: int) -> torch.Tensor:
    m2, n2 = W.shape[0] // m1, W.shape[1] // n1
    rows = [W[i * m2:(i + 1) * m2, j * n2:(j + 1) * n2].reshape(-1) for i in range(m1) for j in range(n1)]
    return torch.stack(rows)  # (m1·n1, m2·n2): row i·n1 + j = vec(block (i, j))


def test_closest_divisor():
    assert [S.closest_divisor(k) for k in (576, 1536, 96, 7, 1, 12)] == [24, 32, 8, 1, 1, 3]


def test_rearrange_is_the_block_vectorization_and_unrearrange_inverts_it():
    W = randn(6, 12)
    M = S.rearrange(W, 2, 3)
    torch.testing.assert_close(M, rearranged_by_loops(W, 2, 3), rtol=0, atol=0)
    torch.testing.assert_close(S.unrearrange(M, 2, 3, 3, 4), W, rtol=0, atol=0)
    batch = torch.stack([W, 2 * W])
    torch.testing.assert_close(S.rearrange(batch, 2, 3)[1], 2 * M)


def test_kron_sum_matches_torch_kron():
    sigma, U, V = randn(3, seed=1), randn(3, 2, 3, seed=2), randn(3, 4, 5, seed=3)
    dense = sum(sigma[k] * torch.kron(U[k], V[k]) for k in range(3))
    torch.testing.assert_close(S.kron_sum(sigma, U, V), dense)
    torch.testing.assert_close(S.kron_rearranged(sigma, U, V), S.rearrange(dense, 2, 3))


def test_kpsvd_reconstructs_and_its_spectrum_is_that_of_the_rearrangement():
    W = randn(6, 12, seed=4)
    sigma, U, V = S.kpsvd(W, 2, 3, torch.float64)
    assert U.shape == (6, 2, 3) and V.shape == (6, 3, 4)  # K = min(2·3, 3·4)
    torch.testing.assert_close(S.kron_sum(sigma, U, V), W)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(rearranged_by_loops(W, 2, 3)))
    assert torch.all(sigma[:-1] >= sigma[1:])


def test_kpsvd_of_a_kronecker_product_has_one_term():
    A, B = randn(2, 3, seed=5), randn(3, 4, seed=6)
    sigma, U, V = S.kpsvd(torch.kron(A, B), 2, 3, torch.float64)
    assert float(sigma[0]) == pytest.approx(float(A.norm() * B.norm()))
    assert float(sigma[1:].abs().max()) < 1e-12
    torch.testing.assert_close(sigma[0] * torch.kron(U[0], V[0]), torch.kron(A, B))
    with pytest.raises(ValueError, match="do not divide"):
        S.kpsvd(randn(6, 12), 4, 3)


@pytest.mark.parametrize("core", ["pinv", "slice"])
def test_nystrom_factors_are_copies_of_the_first_rows_and_columns(core):
    W = randn(2, 7, 9, seed=7)
    C, N, R = S.nystrom(W, 3, core, torch.float64)
    torch.testing.assert_close(C, W[:, :, :3], rtol=0, atol=0)
    torch.testing.assert_close(R, W[:, :3, :], rtol=0, atol=0)
    corner = W[:, :3, :3]
    torch.testing.assert_close(N, torch.linalg.pinv(corner) if core == "pinv" else corner)
    assert C.is_contiguous() and R.is_contiguous() and N.is_contiguous()
    C.zero_()
    assert bool(W[:, :, :3].abs().sum() > 0)  # not a view of W


def test_nystrom_is_exact_for_a_rank_r_matrix():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(8, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 10, generator=g, dtype=torch.float64)
    C, N, R = S.nystrom(W, 3, "pinv", torch.float64)
    torch.testing.assert_close(C @ N @ R, W)  # C W[:r,:r]⁺ R = W when rank W = rank W[:r,:r] = r
    with pytest.raises(ValueError, match="core must be 'pinv' or 'slice'"):
        S.nystrom(W, 3, "svd")


def test_skew_and_cayley():
    entries = randn(6, seed=9)
    K = S.skew(entries, 4)
    torch.testing.assert_close(K, -K.T, rtol=0, atol=0)
    i, j = torch.triu_indices(4, 4, 1)
    torch.testing.assert_close(K[i, j], entries, rtol=0, atol=0)
    Q = S.cayley(K)
    eye = torch.eye(4, dtype=K.dtype)
    torch.testing.assert_close(Q, (eye - K) @ torch.linalg.inv(eye + K))
    torch.testing.assert_close(Q.T @ Q, eye)
    assert float(torch.linalg.det(Q)) == pytest.approx(1.0)
    torch.testing.assert_close(S.cayley(torch.zeros(4, 4, dtype=K.dtype)), eye, rtol=0, atol=0)


def test_head_qr_factors_each_head():
    W = randn(2, 8, 6, seed=10)  # heads of 4 rows
    Q, R = S.head_qr(W, 4)
    assert Q.shape == (2, 2, 6, 4) and R.shape == (2, 2, 4, 4)
    for b in range(2):
        for h in range(2):
            torch.testing.assert_close(R[b, h].T @ Q[b, h].T, W[b, 4 * h:4 * (h + 1)])  # W_j = R_jᵀ Q_jᵀ
            torch.testing.assert_close(Q[b, h].T @ Q[b, h], torch.eye(4, dtype=W.dtype))
            assert torch.all(R[b, h].diagonal() >= 0) and torch.equal(R[b, h], torch.triu(R[b, h]))


def test_head_product_svd_is_the_svd_of_each_heads_product():
    Wo, Wv = randn(10, 8, seed=11), randn(8, 9, seed=12)  # 2 heads of 4
    U, Sv, Vh = S.head_product_svd(Wo, Wv, 4)
    assert U.shape == (2, 10, 4) and Sv.shape == (2, 4) and Vh.shape == (2, 4, 9)
    for h in range(2):
        M = Wo[:, 4 * h:4 * (h + 1)] @ Wv[4 * h:4 * (h + 1)]
        torch.testing.assert_close((U[h] * Sv[h]) @ Vh[h], M)
        torch.testing.assert_close(Sv[h], torch.linalg.svdvals(M)[:4])
        torch.testing.assert_close(U[h].T @ U[h], torch.eye(4, dtype=M.dtype))
        idx = U[h].abs().argmax(0)  # the engine's sign convention: largest entry of each u positive
        assert torch.all(U[h][idx, torch.arange(4)] > 0)


def test_block_diagonal():
    blocks = randn(3, 2, 2, seed=13)
    D = S.block_diagonal(blocks)
    expected = torch.zeros(6, 6, dtype=blocks.dtype)
    for h in range(3):
        expected[2 * h:2 * h + 2, 2 * h:2 * h + 2] = blocks[h]
    torch.testing.assert_close(D, expected, rtol=0, atol=0)
