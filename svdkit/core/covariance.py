"""Covariance math: pure functions, tensors in and tensors out (the one home for it).

Input covariances C (n × n, n = a layer's input features) come from :func:`svdkit.calibrate`. Data-aware
methods use them to orient a decomposition of W (m × n, ``nn.Linear`` layout): CorDA takes the SVD of
W·C̃ (https://arxiv.org/abs/2406.05223); SVD-LLM's whitening will reuse the damping here. Damping, inverse
and products are computed in float64 (the C̃⁻¹ step multiplies rounding errors by cond(C̃)). Nothing here
knows about modules or configs beyond using a name in messages.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
from torch import Tensor

from svdkit.core.linalg import Which, fix_signs, truncated_svd

MAX_DOUBLINGS = 60  # δ·2⁶⁰: far beyond any covariance that is finite


def check_covariance(C: Tensor, n: int, name: str = "covariance") -> None:
    """Raise a specific error for a statistic that cannot be a layer's input covariance."""
    if C.shape != (n, n):
        raise ValueError(f"{name}: the input covariance has shape {tuple(C.shape)}, but the layer has {n} input "
                         f"features (expected {n}×{n}); the statistics belong to another model or targets.")  # fmt: skip
    if not bool(torch.isfinite(C).all()):
        raise ValueError(f"{name}: the input covariance has NaN/Inf entries; the calibration activations overflowed "
                         "(check the model's dtype and the calibration data) — recompute the statistics.")  # fmt: skip
    if not bool(C.any()):
        raise ValueError(f"{name}: the input covariance is all zeros — this module never saw a calibration token "
                         "(its input was always masked or zero). Calibrate with data that reaches it, or exclude "
                         "it from the targets.")  # fmt: skip
    if float(C.diagonal().mean()) <= 0:
        raise ValueError(f"{name}: the input covariance has a non-positive mean diagonal "
                         f"({float(C.diagonal().mean()):.3g}); it is not a covariance XᵀX. Recompute the statistics.")


def damped_covariance(
    C: Tensor, name: str = "covariance", damping: float = 0.01, tol: float = 0.05
) -> tuple[Tensor, Tensor, float]:
    """(C̃, C̃⁻¹, δ) in float64 with C̃ = C + δ·mean(diag C)·I.

    CorDA's rule (https://arxiv.org/abs/2406.05223, official code): δ starts at ``damping`` and doubles until
    ‖C̃ C̃⁻¹ − I‖_F < ``tol``. Here C̃ must also be positive definite (its Cholesky factorization succeeds) —
    the same result for every true covariance XᵀX, but an indefinite input (rounding, a corrupted file) is
    damped instead of decomposed. The inverse comes from the Cholesky factor, so no LAPACK error escapes:
    a failure only doubles δ. Warns once (naming ``name``) when δ had to grow beyond ``damping``; raises for
    a covariance that is all zeros or not finite (see :func:`check_covariance`).
    """
    check_covariance(C, C.shape[-1], name)
    C = C.to(torch.float64)
    n = C.shape[-1]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    mean_diag = C.diagonal().mean()
    delta = float(damping)
    for _ in range(MAX_DOUBLINGS):
        damped = C + (delta * mean_diag) * eye
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            error = float(torch.linalg.matrix_norm(damped @ inverse - eye))
            if error < tol:
                if delta != damping:
                    warnings.warn(
                        f"{name}: the input covariance is ill-conditioned (singular or indefinite); damping δ "
                        f"was raised from {damping:g} to {delta:g} (C̃ = C + δ·mean(diag C)·I) so that "
                        f"‖C̃C̃⁻¹ − I‖_F = {error:.2g} < {tol:g}. More (and more varied) calibration samples "
                        "give a better-conditioned covariance.",
                        stacklevel=2,
                    )
                return damped, inverse, delta
        delta *= 2
    raise ValueError(f"{name}: the input covariance could not be damped to an invertible matrix (δ reached "
                     f"{delta:g}); it is not a usable covariance — recompute the statistics.")  # fmt: skip


def covariance_svd(
    weight: Tensor,
    damped: Tensor,
    inverse: Tensor,
    rank: int,
    which: Which = "top",
    method: str = "exact",
    seeds: Sequence[int] | None = None,
    niter: int = 4,
    oversample: int = 8,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """The covariance-oriented SVD W C̃ = U Σ V̂ᵀ, returned as (U_idx, Σ_idx, (V̂ᵀ C̃⁻¹)_idx) in float64.

    ``weight`` (..., m, n), ``damped``/``inverse`` (..., n, n) from :func:`damped_covariance`; ``which``
    picks the top-r or bottom-r triplets (``method``/``seeds``/``niter``/``oversample`` as
    :func:`svdkit.core.linalg.truncated_svd`). W C̃ and V̂ᵀC̃⁻¹ are formed in float64; the SVD itself runs in
    ``dtype`` (float32 is about 2× faster on a CPU; its rounding, about 1e-7·σ₁, is then multiplied by
    C̃⁻¹). With r = min(m, n) and float64, U diag(Σ) (V̂ᵀC̃⁻¹) = W to rounding. The rows of V̂ᵀC̃⁻¹ are
    not orthonormal.
    """
    W = weight.to(torch.float64)
    product = (W @ damped.to(W.device, torch.float64)).to(dtype)
    U, S, Vh = truncated_svd(product, rank, which, method, seeds, niter, oversample, dtype)
    return U.double(), S.double(), Vh.double() @ inverse.to(W.device, torch.float64)


# -- whitening for low-rank compression (SVD-LLM v1/v2) ---------------------------------------------------
def cholesky_whitening(C: Tensor, name: str = "covariance") -> tuple[Tensor, Tensor]:
    """(S, S⁻¹) in float64 with S lower-triangular and S Sᵀ = C (SVD-LLM v1, https://arxiv.org/abs/2403.07378).

    As the paper's code: the Cholesky factor of C itself; only when C is not numerically positive definite it
    is damped, C + (−λ_min + ε)·I with ε = 1e-6·mean(diag C) (the code's 1e-6, made relative to C's scale),
    doubling ε until the factorization succeeds, with a warning naming ``name``. S⁻¹ by a triangular solve.
    """
    check_covariance(C, C.shape[-1], name)
    C = C.to(torch.float64)
    n = C.shape[-1]
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    L, info = torch.linalg.cholesky_ex(C)
    if int(info) != 0:
        lam_min = float(torch.linalg.eigvalsh(C)[0])
        eps = 1e-6 * float(C.diagonal().mean())
        for _ in range(MAX_DOUBLINGS):
            L, info = torch.linalg.cholesky_ex(C + (max(-lam_min, 0.0) + eps) * eye)
            if int(info) == 0:
                break
            eps *= 2
        else:
            raise ValueError(f"{name}: the input covariance could not be damped to a positive definite matrix.")
        warnings.warn(f"{name}: the input covariance is not positive definite (λ_min = {lam_min:.3g}; too few or too "
                      f"similar calibration tokens); whitening damped it by {max(-lam_min, 0.0) + eps:.3g}·I. Pass more "
                      "calibration samples for a faithful whitening.", stacklevel=2)  # fmt: skip
    return L, torch.linalg.solve_triangular(L, eye, upper=False)


def eigen_whitening(C: Tensor, name: str = "covariance") -> tuple[Tensor, Tensor]:
    """(S, S⁺) in float64 with S = U_s Λ^{1/2} and S Sᵀ = C, from the eigendecomposition C = U_s Λ U_sᵀ.

    SVD-LLM V2's loss-optimized truncation (https://arxiv.org/abs/2503.12340, Theorem 3.1: W' =
    U_ws Trunc(S_ws) V_wsᵀ Λ^{-1/2} U_sᵀ with U_ws S_ws V_wsᵀ = SVD(W U_s Λ^{1/2})). Every PSD C has this square
    root, so no damping is needed: eigenvalues below n·eps·λ_max (rounding) are set to 0 and their inverse
    roots to 0, making S⁺ = Λ^{-1/2} U_sᵀ the pseudo-inverse (directions the data never visits are dropped).
    """
    check_covariance(C, C.shape[-1], name)
    lam, U = torch.linalg.eigh(C.to(torch.float64))
    floor = C.shape[-1] * torch.finfo(torch.float64).eps * float(lam[-1].clamp(min=0))
    lam = torch.where(lam > floor, lam, torch.zeros_like(lam))
    root = lam.sqrt()
    inv_root = torch.where(root > 0, 1.0 / root.clamp(min=1e-300), torch.zeros_like(root))
    return U * root, inv_root.unsqueeze(-1) * U.mT


def whitened_truncation(
    weight: Tensor, scale: Tensor | None, scale_inv: Tensor | None, rank: int, method: str = "exact",
    seed: int | None = None, niter: int = 4, oversample: int = 8,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """Rank-``rank`` factors of W in a transformed input space: W S = U Σ Vᵀ,  W' = (U_k Σ_k^{1/2})(Σ_k^{1/2} V_kᵀ S⁻¹).

    ``scale`` is S: an (n × n) matrix (whitening), an (n,) vector (a diagonal scaling: ASVD, FWSVD), or None
    (S = I: plain truncated SVD); ``scale_inv`` its (pseudo-)inverse (same form). Returns (A m×k, B k×n,
    σ of W S (every one with ``method="exact"``, the top ``rank`` otherwise), ‖W S‖_F²) in float64. The split
    √Σ to both factors is SVD-LLM's and ASVD's. The SVD runs in float64 (the products are small next to it
    on these sizes and the whitened spectra span many decades); ``"randomized"`` uses the seeded engine.
    """
    W = weight.to(torch.float64)
    if scale is None:
        M = W
    elif scale.ndim == 1:
        M = W * scale.to(W)
    else:
        M = W @ scale.to(W)
    total = float(M.square().sum())
    if method == "exact":
        Uk, S, Vk = gram_svd(M, rank)
        Sk = S[:rank]
    else:
        Uk, Sk, Vk = truncated_svd(M, rank, "top", "randomized", [seed or 0], niter, oversample, torch.float64)
        S = Sk
    root = Sk.sqrt()
    A = Uk * root
    B = root.unsqueeze(-1) * Vk
    if scale_inv is not None:
        B = B * scale_inv.to(B) if scale_inv.ndim == 1 else B @ scale_inv.to(B)
    return A, B, S, total


def gram_svd(M: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_k, every σ, V_kᵀ) of M (m × n) in float64 from the eigendecomposition of its smaller Gram matrix.

    With m ≤ n: M Mᵀ = U Λ Uᵀ, σ = √Λ, V_kᵀ = Σ_k⁻¹ U_kᵀ M (transposed roles for m > n). 3–4× faster than
    LAPACK's SVD on a CPU; the Gram squares the condition number, so singular values below ~1e-8·σ₁ lose
    relative accuracy — harmless for the kept top-k triplets (σ_k ≫ 1e-8·σ₁ at any useful rank; a kept σ at
    rounding level is refused) and for the discarded energy Σ_{i>k} σ_i² (computed from Λ directly).
    Signs fixed (:func:`svdkit.core.linalg.fix_signs`).
    """
    M = M.to(torch.float64)
    tall = M.shape[0] > M.shape[1]
    X = M.mT if tall else M  # (p × q), p ≤ q
    lam, U = torch.linalg.eigh(X @ X.mT)
    lam, U = lam.flip(-1).clamp(min=0), U.flip(-1)
    sigma = lam.sqrt()
    if float(sigma[rank - 1]) <= 1e-7 * float(sigma[0]):
        U_, S_, Vh_ = torch.linalg.svd(M, full_matrices=False)  # the kept tail is at rounding level: be exact
        U_, Vh_ = fix_signs(U_, Vh_)
        return U_[:, :rank], S_, Vh_[:rank]
    Uk = U[:, :rank]
    Vk = (Uk.mT @ X) / sigma[:rank].unsqueeze(-1)  # (k × q)
    if tall:
        Uk, Vk = Vk.mT, Uk.mT
    Uk, Vk = fix_signs(Uk, Vk)
    return Uk, sigma, Vk


def least_squares_left(weight: Tensor, B: Tensor, cross: Tensor, C_cc: Tensor) -> Tensor:
    """SVD-LLM v1's closed-form layer-wise update of the left factor (https://arxiv.org/abs/2403.07378v1):

        A* = argmin_A ‖X_c Bᵀ Aᵀ − X_o Wᵀ‖_F = W (X_oᵀX_c) Bᵀ (B X_cᵀX_c Bᵀ)⁻¹,

    with X_o the layer's inputs in the original model, X_c its inputs in the compressed one (rows = tokens):
    ``cross`` = X_oᵀX_c and ``C_cc`` = X_cᵀX_c (n × n). The k×k system is solved by Cholesky in float64,
    damped by 1e-8·mean diag if it is singular. When X_c = X_o and B comes from whitening this returns the
    whitened A unchanged (the whitened truncation is already optimal for fixed inputs).
    """
    W, B = weight.to(torch.float64), B.to(torch.float64)
    rhs = W @ cross.to(W) @ B.mT  # (m, k)
    G = B @ C_cc.to(B) @ B.mT  # (k, k)
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        L = torch.linalg.cholesky(G + 1e-8 * float(G.diagonal().mean().clamp(min=1e-300)) * eye)
    return torch.cholesky_solve(rhs.mT, L).mT


def uniform_rank(m: int, n: int, ratio: float) -> int:
    """k = ⌊(1 − ratio)·m·n/(m + n)⌋: the rank whose two factors hold (1 − ratio) of the m·n parameters."""
    return int(math.floor((1.0 - ratio) * m * n / (m + n) + 1e-9))
