"""Regression test for issue 11 item 10: the randomized bottom-r SVD on a bulk (noise-like) spectrum."""

from __future__ import annotations

import torch

from svdkit.core.linalg import svd_bottom_randomized, truncated_svd


def _bottom_reference(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ ascending, V (n × r)) of the r smallest singular values, from the eigendecomposition of WᵀW (fp64)."""
    evals, evecs = torch.linalg.eigh(W.double().T @ W.double())
    return evals[:r].sqrt(), evecs[:, :r]


def test_bottom_r_of_a_gaussian_matrix_is_accurate_at_the_default_niter():
    r = 16
    W = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))
    S_ref, V_ref = _bottom_reference(W, r)
    U, S, Vh = truncated_svd(W, r, "bottom", "randomized", seeds=[0], niter=4)  # the configs' default niter
    cosines = torch.linalg.svdvals(V_ref.T @ Vh.double().T)  # cosines of the principal angles
    assert cosines.min() > 0.999  # niter=4 without the convergence test: 0.04
    sigma = S.double().flip(0)  # S is descending
    assert ((sigma - S_ref).abs() / S_ref).max() < 1e-5  # was 6 %
    torch.testing.assert_close((U.double().T @ W.double() @ Vh.double().T), torch.diag(S.double()), atol=1e-3, rtol=0)


def test_a_fixed_iteration_count_is_still_available_and_a_gapped_spectrum_converges_at_once():
    g = torch.Generator().manual_seed(1)
    Q1 = torch.linalg.qr(torch.randn(200, 60, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64)).Q
    S_true = torch.cat([torch.linspace(10, 5, 56, dtype=torch.float64), torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)])
    W = (Q1 * S_true) @ Q2.T  # a clear gap below the bulk: few iterations suffice
    _, S, _ = svd_bottom_randomized(W, 4, [0], niter=2)
    torch.testing.assert_close(S, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), atol=1e-8, rtol=0)
    _, S_fixed, _ = svd_bottom_randomized(W, 4, [0], niter=2, tol=None)
    assert S_fixed.shape == (4,)
