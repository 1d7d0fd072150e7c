"""Projections onto the complement of a protected singular subspace (Sculpting Subspaces / OSFT).

Pure functions (tensors in, tensors out). A weight's protected subspace is its top-k singular triplets
(U_k, Σ_k, V_k), k chosen by an energy share; an update X is made orthogonal to it on both sides:

    P(X) = (I − U_k U_kᵀ) X (I − V_k V_kᵀ)          so U_kᵀ P(X) = 0 and P(X) V_k = 0.

Nayak et al. 2025, https://arxiv.org/abs/2504.07097 (§3: updates constrained to the orthogonal complement
of the high-rank subspace of each weight).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from svdkit.core.linalg import fix_signs
from svdkit.core.linalg_rank import energy_rank


def protected_basis(W: Tensor, share: float, dtype: torch.dtype = torch.float32,
                    ratio: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(U_k (m×k), σ_k (k,), V_k (n×k)) of W's exact thin SVD, k = the smallest rank whose squared singular
    values reach ``share`` of ‖W‖_F² (:func:`svdkit.core.linalg_rank.energy_rank`); ``share`` = 0 gives k = 0
    (empty bases: nothing protected). With ``ratio``, k = :func:`ratio_rank` instead (``share`` unused).
    Computed in ``dtype``; signs fixed (deterministic)."""
    if W.ndim != 2:
        raise ValueError(f"protected_basis needs a matrix, got shape {tuple(W.shape)}.")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"protected_basis: share must be in [0, 1], got {share!r}.")
    m, n = W.shape
    if share == 0.0:
        return W.new_zeros(m, 0, dtype=dtype), W.new_zeros(0, dtype=dtype), W.new_zeros(n, 0, dtype=dtype)
    U, S, Vh = torch.linalg.svd(W.detach().to(dtype), full_matrices=False)
    U, Vh = fix_signs(U, Vh)
    k = energy_rank(S, share) if ratio is None else ratio_rank(m, n, ratio)
    return U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous()


def ratio_rank(m: int, n: int, ratio: float) -> int:
    """k = min(⌊ratio·min(m, n)⌋, min(m, n) − 1): a fixed share of every matrix's directions protected, at
    least one left to train (the rule of the authors' released OSFT trainer, ``rank_ratio``)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio_rank: ratio must be in [0, 1], got {ratio!r}.")
    full = min(m, n)
    return max(0, min(math.floor(full * ratio), full - 1))


def complement_projection(X: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """P(X) = (I − U Uᵀ) X (I − V Vᵀ) for orthonormal columns U (m×k), V (n×k), as two rank-k corrections
    (4·m·n·k multiply-adds, never an m×m or n×n projector). k = 0 returns X unchanged (a new tensor)."""
    if X.ndim != 2 or U.shape[0] != X.shape[0] or V.shape[0] != X.shape[1] or U.shape[1] != V.shape[1]:
        raise ValueError(f"complement_projection: X {tuple(X.shape)} needs U (m×k) and V (n×k) with matching m, n, k; "
                         f"got U {tuple(U.shape)}, V {tuple(V.shape)}.")  # fmt: skip
    U, V = U.to(X.dtype), V.to(X.dtype)
    Y = X - U @ (U.T @ X)
    return Y - (Y @ V) @ V.T


def protect(W: Tensor, U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """W with its protected part restored: P(W) + U diag(σ) Vᵀ.

    If (U, σ, V) are top singular triplets of W₀ and W = W₀ + Δ, this equals W₀ + P(Δ) (because
    U Uᵀ W₀ = W₀ V Vᵀ = U Uᵀ W₀ V Vᵀ = U Σ Vᵀ): the accumulated update projected, without keeping W₀.
    """
    return complement_projection(W, U, V) + (U.to(W.dtype) * S.to(W.dtype)) @ V.to(W.dtype).T
