"""Ranks and subspaces read from a spectrum or a basis: energy ranks, effective rank, principal angles, orthonormality.

Pure functions, tensors in and numbers (or tensors) out. Rank rules of the adapters (SVFit, SoKA,
QR-LoRA), the diagnostics (:mod:`svdkit.inspection.diagnostics`) and the orthonormality regularizers
(SORSA, AdaLoRA, KaSA) all read their spectra and bases here, so each formula has one definition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TIE = 1e-12  # an energy share within this of the threshold counts as reaching it (fp64 rounding of Σ)


def cumulative_energy(values: Tensor, power: float = 2.0, total=None) -> Tensor:
    """E(k) = Σ_{i≤k} |v_i|^p / T, k = 1..K, in fp64; T = Σ_i |v_i|^p unless ``total`` is given.

    ``values`` (K,) are singular values (p = 2: energy σ², p = 1: nuclear share) or any non-negative
    spectrum-like diagonal (QR-LoRA reads |R_ii|). ``total``: the full energy when ``values`` holds only
    the top K of a longer spectrum (e.g. ‖W‖_F² for the top-K σ with p = 2).
    """
    e = values.detach().double().abs()
    if power == 2:
        e = e.square()
    elif power != 1:
        e = e**power
    T = e.sum() if total is None else torch.as_tensor(total, dtype=torch.float64)
    return e.cumsum(0) / T


def energy_rank(values: Tensor, share: float, power: float = 2.0, total=None) -> int:
    """The smallest r with Σ_{i≤r} |v_i|^p ≥ share · T (see :func:`cumulative_energy`), in 1..K.

    A share within 1e-12 of the threshold counts as reaching it (rounding of the fp64 sums); a zero
    spectrum (T = 0) gives r = 1; a ``total`` larger than the given values' energy caps r at K.
    """
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"energy_rank: values must be a non-empty 1-D tensor, got shape {tuple(values.shape)}.")
    E = cumulative_energy(values, power, total)
    if not bool(torch.isfinite(E).all()):  # T = 0: every share is undefined; one direction is kept
        return 1
    return min(int((E < share - TIE).sum()) + 1, values.numel())


def elbow_rank(values: Tensor, power: float = 2.0) -> int:
    """The elbow (knee) of the cumulative-energy curve: the largest k maximizing E(k) − k/K.

    E rises above its chord from (0, 0) to (K, 1) while |v_k|^p exceeds the mean, so this keeps the
    terms of above-average energy; a flat spectrum has no elbow and gives K.
    """
    K = values.numel()
    gain = cumulative_energy(values, power) - torch.arange(1, K + 1, dtype=torch.float64) / K
    best = gain.max()
    return int(torch.nonzero(gain >= best - TIE).max()) + 1


def effective_rank(S: Tensor) -> float:
    """Roy & Vetterli (EUSIPCO 2007): exp(−Σ p_i ln p_i), p_i = σ_i / Σ_j σ_j (terms with p_i = 0 add 0).

    ``S``: a 1-D tensor of singular values (σ ≥ 0). 1 for a rank-1 matrix, n for n equal values.
    """
    s = torch.as_tensor(S).detach().to(torch.float64)
    if s.ndim != 1 or s.numel() == 0 or bool((s < 0).any()):
        raise ValueError(f"S must be a non-empty 1-D tensor of non-negative singular values, got shape {tuple(s.shape)}.")
    total = float(s.sum())
    if total == 0:
        raise ValueError("S is all zeros: the effective rank of a zero matrix is undefined.")
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def principal_cosines(X: Tensor, Y: Tensor) -> Tensor:
    """Cosines of the principal angles between span(X) and span(Y) (Björck & Golub 1973), descending.

    X (..., n, p), Y (..., n, q) with orthonormal columns; cos θ_i = σ_i(Xᵀ Y), min(p, q) of them, in fp64.
    For bases that are not orthonormal, orthonormalize first (e.g. ``torch.linalg.qr(X).Q``).
    """
    if X.shape[-2] != Y.shape[-2]:
        raise ValueError(f"principal_cosines: X {tuple(X.shape)} and Y {tuple(Y.shape)} live in different spaces.")
    return torch.linalg.svdvals(X.double().mT @ Y.double()).clamp(max=1.0)


def principal_angles(X: Tensor, Y: Tensor) -> Tensor:
    """The principal angles θ_i = arccos σ_i(Xᵀ Y) ∈ [0, π/2] between span(X) and span(Y), ascending."""
    return torch.arccos(principal_cosines(X, Y))


def best_cosines(X: Tensor, Y: Tensor) -> Tensor:
    """For each column x_i of X (n, p), max_j |⟨x_i, y_j⟩| over the columns of Y (n, q): (p,) in fp64.

    With unit columns this is the cosine between x_i and its closest direction among Y's columns (not
    its angle to span(Y): that would be ‖Yᵀx_i‖).
    """
    return (X.double().mT @ Y.double()).abs().amax(dim=-1)


def gram_deviation(Q: Tensor, rows: bool = False) -> Tensor:
    """‖QᵀQ − I‖_F (orthonormal columns) or, with ``rows``, ‖QQᵀ − I‖_F (orthonormal rows); not squared.

    Q: (m, r) for columns, (r, n) for rows; differentiable (the orthonormality regularizers use it).
    """
    G = Q @ Q.T if rows else Q.T @ Q
    return torch.linalg.matrix_norm(G - torch.eye(G.shape[0], dtype=G.dtype, device=G.device))


def orthogonality(B: Tensor, A: Tensor) -> Tensor:
    """‖BᵀB − I_r‖_F + ‖AAᵀ − I_r‖_F for a factor pair B (m, r), A (r, n): 0 iff B has orthonormal columns and
    A orthonormal rows (SORSA's L_o, AdaLoRA's R(P, Q), KaSA's ΔU/ΔV term; not squared, differentiable)."""
    return gram_deviation(B, rows=False) + gram_deviation(A, rows=True)
