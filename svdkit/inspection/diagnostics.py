"""Spectral diagnostics of a fine-tuned weight (ANCHORS.md §6), as pure functions of matrices.

    n = intruder_dimensions(W0, W1, k=10, eps=0.5)     # LoRA vs Full Fine-tuning: An Illusion of Equivalence
    r = effective_rank(S)                              # Roy & Vetterli 2007

Intruder dimensions (Shuttleworth et al. 2024, https://arxiv.org/abs/2410.21228): with W0 = U0 Σ0 V0ᵀ and
W1 = U1 Σ1 V1ᵀ, a top-k left singular vector u of W1 is an *intruder* when max_j |⟨u, U0[:, j]⟩| < ε over
ALL left singular vectors of W0 (the paper sweeps ε; PEFT's utility uses 0.5, as here).

Effective rank (Roy & Vetterli, EUSIPCO 2007): p_i = σ_i / Σ_j σ_j, erank = exp(−Σ_i p_i ln p_i)
(terms with p_i = 0 contribute 0); it is 1 for a rank-1 matrix and n for n equal singular values. Both
read their spectra and bases through svdkit.core.linalg and svdkit.core.linalg_rank (effective_rank lives there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdkit.core.linalg import svd_exact
from svdkit.core.linalg_rank import best_cosines, effective_rank

__all__ = ["intruder_dimensions", "effective_rank"]  # effective_rank lives in svdkit.core.linalg_rank


def _matrix(W: Tensor, name: str) -> Tensor:
    if W.ndim != 2 or not torch.is_floating_point(W):
        raise ValueError(f"{name} must be a 2-D floating-point matrix, got shape {tuple(W.shape)} and dtype {W.dtype}.")
    return W.detach().to(torch.float64)


def intruder_dimensions(W0: Tensor, W1: Tensor, k: int = 10, eps: float = 0.5) -> int:
    """How many of the top-``k`` left singular vectors of ``W1`` have |cosine| < ``eps`` with every left
    singular vector of ``W0`` (W0, W1: the same m × n weight before and after fine-tuning)."""
    A, B = _matrix(W0, "W0"), _matrix(W1, "W1")
    if A.shape != B.shape:
        raise ValueError(f"W0 {tuple(A.shape)} and W1 {tuple(B.shape)} must have the same shape.")
    if not 0 < k <= min(A.shape):
        raise ValueError(f"k must be in [1, min(m, n) = {min(A.shape)}], got {k}.")
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1], got {eps}.")
    U0 = svd_exact(A, min(A.shape), dtype=torch.float64)[0]  # (m, min(m, n)): every left singular vector of W0
    U1 = svd_exact(B, k, dtype=torch.float64)[0]  # (m, k)
    best = best_cosines(U1, U0)  # (k,): the closest pretrained direction of each
    return int((best < eps).sum())
