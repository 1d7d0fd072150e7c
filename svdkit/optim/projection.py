"""Subspace bases for low-rank-gradient optimizers, and what happens to Adam's moments when a basis changes.

Every function works on the *oriented* gradient X (s × L, s = min(m, n)): X = G for a wide or square weight
(m ≤ n, left projector) and X = Gᵀ for a tall one (right projector), so the stored projector P (s × r)
is always on the smaller side and the moments (r × L) on the larger, as in GaLore's ``proj_type="std"``
(https://arxiv.org/abs/2403.03507, §4.2; memory m·r + 2·n·r for m ≤ n). Pure tensor functions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from svdkit.core import linalg

PROJECTIONS = ("svd", "randomized", "dct", "online-pca", "random")
ON_SWITCH = ("keep", "reset", "rotate")


def oriented(grad: Tensor) -> Tensor:
    """X = G (m ≤ n) or Gᵀ (m > n): the smaller side first. The same function maps an update back."""
    return grad if grad.shape[0] <= grad.shape[1] else grad.T


def top_left(X: Tensor, rank: int, method: str = "svd", seed: int = 0, niter: int = 2) -> Tensor:
    """P (s × r): the top-r left singular vectors of X, exact (LAPACK) or randomized (Halko et al. subspace
    iteration, :func:`svdkit.core.linalg.svd_randomized`, seeded). Computed in fp32; an exact SVD that fails
    to converge (galore-torch issue #58) is retried in fp64, then replaced by the randomized one."""
    if method == "randomized":
        return linalg.svd_randomized(X, rank, [seed], niter=niter)[0]
    try:
        return linalg.svd_exact(X, rank)[0]
    except torch.linalg.LinAlgError:
        try:
            return linalg.svd_exact(X, rank, dtype=torch.float64)[0].float()
        except torch.linalg.LinAlgError:
            return linalg.svd_randomized(X, rank, [seed], niter=max(niter, 4))[0]


def random_basis(s: int, rank: int, seed: int, device=None) -> Tensor:
    """A uniformly random r-dimensional subspace: the Q factor of a seeded s × r Gaussian (s × r, orthonormal
    columns). Orthonormal rather than GaLore's raw N(0, 1/r) sketch, so ``scale`` means the same as with SVD."""
    G = linalg.gaussian((s, rank), [seed], torch.float32, device)[0]
    return torch.linalg.qr(G).Q


def dct_select(X: Tensor, rank: int, D: Tensor) -> Tensor:
    """Indices (r,) of the DCT-II basis vectors best aligned with X: the r rows of D X with the largest ℓ1
    norm, in decreasing order (Modoranu et al., https://arxiv.org/abs/2505.17967, dynamic column selection).
    One matmul and a sort; the projector is ``D[idx].T`` and only ``idx`` is stored."""
    return torch.topk((D @ X.float()).abs().sum(dim=1), rank).indices


def online_pca_grad(P: Tensor, X: Tensor, ortho: float) -> Tensor:
    """∇_P of the online-PCA loss of Online Subspace Descent (https://arxiv.org/abs/2408.12857, §3.2):

        L(P) = ‖P Pᵀ X̃ − X̃‖²_F + λ ‖PᵀP − I‖²_F,   X̃ = X / ‖X‖_F,
        ∇L = 2 (E X̃ᵀ P + X̃ Eᵀ P) + 4 λ P (PᵀP − I),   E = P Pᵀ X̃ − X̃.
    """
    Xn = X.float() / X.float().norm().clamp_min(1e-30)
    E = P @ (P.T @ Xn) - Xn
    grad = 2 * (E @ (Xn.T @ P) + Xn @ (E.T @ P))
    if ortho:
        grad = grad + 4 * ortho * P @ (P.T @ P - torch.eye(P.shape[1], dtype=P.dtype, device=P.device))
    return grad


def cosine_first(P_old: Tensor, P_new: Tensor) -> float:
    """|cos| between the first basis vectors of two projectors (Q-GaLore's lazy-refresh test, §3.2)."""
    a, b = P_old[:, 0].float(), P_new[:, 0].float()
    return float((a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-30))


def transport(exp_avg: Tensor, exp_avg_sq: Tensor, C: Tensor, bc1: float, bc2: float) -> tuple[Tensor, Tensor]:
    """Moments re-expressed in a new basis, C = P_newᵀ P_old (r × r) ("rotate").

    The first moment is a linear function of the gradients, so m' = C m exactly. The second moment is not:
    with m̂ = m / (1 − β1ᵗ), v̂ = v / (1 − β2ᵗ) the coordinate-wise mean and E[x²], the variance v̂ − m̂² is
    carried by C∘C (independent coordinates) and the mean part exactly (LDAdam's rule,
    https://arxiv.org/abs/2410.16103, §3):  v̂' = (C∘C) max(v̂ − m̂², 0) + (C m̂)².  Returns (m', v') in the
    optimizer's un-corrected storage convention.
    """
    m_hat, v_hat = exp_avg / bc1, exp_avg_sq / bc2
    new_m_hat = C @ m_hat
    new_v_hat = (C * C) @ (v_hat - m_hat.square()).clamp_min(0) + new_m_hat.square()
    return new_m_hat * bc1, new_v_hat * bc2


def residual_support(X: Tensor, P: Tensor, density: float) -> Tensor:
    """Ω for GaLore+'s sparsely coded residual: flat indices (k,), ascending, of the k = ⌈density · s · L⌉
    entries of E = X − P Pᵀ X (what the projection drops) with the largest |E|."""
    E = X.float() - P @ (P.T @ X.float())
    k = min(E.numel(), max(1, math.ceil(density * E.numel())))
    return torch.topk(E.abs().reshape(-1), k).indices.sort().values


def residual_at(X: Tensor, P: Tensor, R: Tensor, idx: Tensor) -> Tensor:
    """(X − P R)[idx] (k,) for flat indices of the s × L matrix X, R = Pᵀ X: row i of P times column j of R
    per entry (k·r work; the s × L residual is never formed)."""
    rows, cols = idx // X.shape[1], idx % X.shape[1]
    return X[rows, cols].float() - (P[rows] * R[:, cols].T).sum(dim=1)
