"""Spectral diagnostics of a fine-tuned weight (ANCHORS.md §6), as pure functions of matrices.

    n = intruder_dimensions(W0, W1, k=10, eps=0.5)     # LoRA vs Full Fine-tuning: An Illusion of Equivalence
    r = effective_rank(S)                              # Roy & Vetterli 2007

Intruder dimensions (Shuttleworth et al. 2024, https://arxiv.org/abs/2410.21228): with W0 = U0 Σ0 V0ᵀ and
W1 = U1 Σ1 V1ᵀ, a top-k left singular vector u of W1 is an *intruder* when max_j |⟨u, U0[:, j]⟩| < ε over
ALL left singular vectors of W0 (the paper sweeps ε; PEFT's utility uses 0.5, as here).

Effective rank (Roy & Vetterli, EUSIPCO 2007): p_i = σ_i / Σ_j σ_j, erank = exp(−Σ_i p_i ln p_i)
(terms with p_i = 0 contribute 0); it is 1 for a rank-1 matrix and n for n equal singular values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
    U0 = torch.linalg.svd(A, full_matrices=False).U
    U1 = torch.linalg.svd(B, full_matrices=False).U[:, :k]
    best = (U1.T @ U0).abs().max(dim=1).values  # (k,): the closest pretrained direction of each
    return int((best < eps).sum())


def effective_rank(S: Tensor) -> float:
    """exp of the Shannon entropy of the normalized singular values ``S`` (a 1-D tensor, σ ≥ 0)."""
    s = torch.as_tensor(S).detach().to(torch.float64)
    if s.ndim != 1 or s.numel() == 0 or bool((s < 0).any()):
        raise ValueError(f"S must be a non-empty 1-D tensor of non-negative singular values, got shape {tuple(s.shape)}.")
    total = float(s.sum())
    if total == 0:
        raise ValueError("S is all zeros: the effective rank of a zero matrix is undefined.")
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))
