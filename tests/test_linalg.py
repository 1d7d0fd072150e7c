"""Property tests of the SVD engine against torch.linalg.svd in fp64."""

from __future__ import annotations

import pytest
import torch

from svdkit.core import linalg


def spectrum_matrix(m: int, n: int, decay: float = 0.8, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A random m×n matrix with singular values decay**i (a clear spectrum, like trained weights)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    S = decay ** torch.arange(k, dtype=torch.float64)
    return ((U * S) @ V.T).to(dtype)


def reference(W: torch.Tensor, r: int, which: str):
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    sl = slice(0, r) if which == "top" else slice(S.numel() - r, S.numel())
    return U[:, sl], S[sl], Vh[sl]


def principal_cosines(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of orthonormal X and Y."""
    return torch.linalg.svdvals(X.double().T @ Y.double())


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
@pytest.mark.parametrize("which", ["top", "bottom"])
def test_exact_matches_lapack_and_is_sign_fixed(shape, which):
    W = spectrum_matrix(*shape)
    U, S, Vh = linalg.svd_exact(W, 5, which)
    Ur, Sr, _ = reference(W, 5, which)
    assert U.shape == (shape[0], 5) and Vh.shape == (5, shape[1])
    torch.testing.assert_close(S.double(), Sr, atol=1e-6, rtol=1e-5)
    assert torch.all(S[:-1] >= S[1:])
    torch.testing.assert_close((U * S) @ Vh, ((Ur * Sr) @ reference(W, 5, which)[2]).float(), atol=1e-5, rtol=0)
    # sign convention: the largest-magnitude entry of every left singular vector is positive
    assert torch.all(U.gather(0, U.abs().argmax(0, keepdim=True)) > 0)
    eye = torch.eye(5)
    torch.testing.assert_close(U.T @ U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-5, rtol=0)


def test_exact_computes_in_fp32_for_half_precision_storage():
    W = spectrum_matrix(32, 24, dtype=torch.bfloat16)
    U, S, Vh = linalg.svd_exact(W, 4)
    assert U.dtype == torch.float32
    U64, S64, Vh64 = linalg.svd_exact(W, 4, dtype=torch.float64)
    assert S64.dtype == torch.float64
    torch.testing.assert_close(S.double(), S64, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(64, 40), (40, 64)])
@pytest.mark.parametrize("niter", [0, 2, 4])
def test_randomized_error_close_to_exact(shape, niter):
    W = spectrum_matrix(*shape, decay=0.9)
    r = 6
    U, S, Vh = linalg.svd_randomized(W, r, seeds=[3], niter=niter, oversample=8)
    Ue, Se, Vhe = linalg.svd_exact(W, r)
    err = torch.linalg.matrix_norm((W - (U * S) @ Vh).double())
    best = torch.linalg.matrix_norm((W - (Ue * Se) @ Vhe).double())
    assert err >= best * (1 - 1e-5)  # Eckart–Young: nothing beats the exact truncation
    assert err <= best * (1.25 if niter == 0 else 1.001)
    torch.testing.assert_close(U.T @ U, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(r), atol=1e-5, rtol=0)
    if niter == 4:  # converged: same vectors as the exact SVD, same signs
        torch.testing.assert_close(U, Ue, atol=1e-2, rtol=0)


def test_randomized_is_deterministic_per_seed_and_batched_equals_single():
    Ws = torch.stack([spectrum_matrix(30, 20, seed=s) for s in range(3)])
    seeds = [linalg.layer_seed(0, f"layer{i}") for i in range(3)]
    batched = linalg.svd_randomized(Ws, 4, seeds, niter=1)
    again = linalg.svd_randomized(Ws, 4, seeds, niter=1)
    assert all(torch.equal(x, y) for x, y in zip(batched, again))
    for i in range(3):
        single = linalg.svd_randomized(Ws[i], 4, [seeds[i]], niter=1)
        for x, y in zip(batched, single):
            torch.testing.assert_close(x[i], y, atol=1e-5, rtol=1e-5)
    other = linalg.svd_randomized(Ws[0], 4, [seeds[0] + 1], niter=0)
    assert not torch.equal(other[0], linalg.svd_randomized(Ws[0], 4, [seeds[0]], niter=0)[0])


def test_layer_seed_is_stable_and_name_dependent():
    assert linalg.layer_seed(0, "model.layers.0.q_proj") == linalg.layer_seed(0, "model.layers.0.q_proj")
    assert linalg.layer_seed(0, "a") != linalg.layer_seed(0, "b") != linalg.layer_seed(1, "b")
    assert linalg.layer_seed(0, "a") == 7462446685336499101  # fixed across machines and versions


@pytest.mark.parametrize("shape", [(60, 36), (36, 60)])
def test_bottom_randomized_finds_the_minor_subspace(shape):
    W = spectrum_matrix(*shape, decay=0.85).double()
    r = 4
    U, S, Vh = linalg.svd_bottom_randomized(W, r, seeds=[0], niter=3)
    Ur, Sr, Vhr = reference(W, r, "bottom")
    torch.testing.assert_close(S, Sr, rtol=1e-6, atol=1e-12)
    assert principal_cosines(U, Ur).min() > 1 - 1e-6
    assert principal_cosines(Vh.T, Vhr.T).min() > 1 - 1e-6
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=U.dtype), atol=1e-8, rtol=0)


def test_truncated_svd_dispatch_and_errors():
    W = spectrum_matrix(20, 12)
    with pytest.raises(ValueError, match="out of range"):
        linalg.truncated_svd(W, 13)
    with pytest.raises(ValueError, match="seeds"):
        linalg.truncated_svd(W, 3, method="randomized")
    with pytest.raises(ValueError, match="unknown SVD method"):
        linalg.truncated_svd(W, 3, method="qr")
    U, S, Vh = linalg.truncated_svd(W, 3, "bottom", "randomized", seeds=[0])
    assert U.dtype == torch.float32 and S.shape == (3,)


def test_check_matrix_names_the_layer():
    with pytest.raises(TypeError, match="q_proj.*int8.*dequantize"):
        linalg.check_matrix(torch.zeros(4, 4, dtype=torch.int8), "q_proj")
    bad = torch.ones(4, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="v_proj.*1 NaN/Inf"):
        linalg.check_matrix(bad, "v_proj")


def test_balanced_factors_reconstruct_with_scaling():
    W = spectrum_matrix(16, 12)
    U, S, Vh = linalg.svd_exact(W, 3)
    B, A = linalg.balanced_factors(U, S, Vh, scale=0.5)
    torch.testing.assert_close(0.5 * B @ A, (U * S) @ Vh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), atol=1e-6, rtol=1e-5)  # √σ on both sides
