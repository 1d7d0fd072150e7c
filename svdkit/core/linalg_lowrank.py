"""Low-rank products and their truncation: the SVD of B·A without forming it, and the error of keeping r.

Pure functions (tensors in, tensors out). Used by the truncated PEFT export of full-rank updates
(DESIGN.md §2.5) and wherever an update is held as factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdkit.core.linalg import fix_signs


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the product B A (B: (..., m, k), A: (..., k, n)) without the m×n product.

    B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), so B A = Q_B (R_B R_Aᵀ) Q_Aᵀ; the small core's SVD U_c S V_cᵀ gives
    U = Q_B U_c and Vᵀ = V_cᵀ Q_Aᵀ. Cost O((m+n)k² + k³) instead of O(mnk). Computes in the inputs' dtype
    (pass fp64 for a reference-grade result); batched over leading dimensions. Returns (U, S, Vh) with
    singular values descending and signs fixed (:func:`svdkit.core.linalg.fix_signs`).
    """
    if B.ndim < 2 or B.ndim != A.ndim or B.shape[-1] != A.shape[-2]:
        raise ValueError(f"factored_svd needs B (m×k) and A (k×n) with matching k; got {tuple(B.shape)} and {tuple(A.shape)}.")
    Qb, Rb = torch.linalg.qr(B)  # (..., m, k'), (..., k', k)
    Qa, Ra = torch.linalg.qr(A.mT)  # (..., n, k''), (..., k'', k)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    U, Vh = fix_signs(Qb @ Uc, Vch @ Qa.mT)
    return U, S, Vh


def truncation_error(S: Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation (Eckart–Young):
    ‖M − M_r‖_F / ‖M‖_F = √(Σ_{i>r} σᵢ²) / √(Σ σᵢ²); 0 for a zero matrix."""
    total = float((S.double() ** 2).sum())
    if total == 0.0:
        return 0.0
    return float(((S.double()[rank:] ** 2).sum() / total).sqrt())


def numerical_rank(S: Tensor, rtol: float | None = None) -> int:
    """Number of singular values above ``rtol``·σ_max (default: len(S)·eps of fp64)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    tol = (rtol if rtol is not None else S.numel() * torch.finfo(torch.float64).eps) * float(S[0])
    return int((S > tol).sum())


def refactorize(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """(B', A') with B'A' = BA, A' = the top-r right singular vectors of BA (orthonormal rows) and
    B' = U·Σ (FedSVD, https://arxiv.org/abs/2505.12805): BA = U Σ Vᵀ by :func:`factored_svd` (never the m×n
    product), r = B's columns. Where BA has rank < r, the extra rows of A' are still orthonormal (the
    complement the QR of Aᵀ spans) and the matching columns of B' are ~0. Computes in the inputs' dtype."""
    r = B.shape[-1]
    U, S, Vh = factored_svd(B, A)
    return U[..., :r] * S[..., None, :r], Vh[..., :r, :]
