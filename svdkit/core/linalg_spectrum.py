"""Eigenvalues of WᵀW without an SVD: the empirical spectral density of a weight.

A pure function, tensors in and out (the companion of :mod:`svdkit.core.linalg`; ranks, effective rank and
principal angles live in :mod:`svdkit.core.linalg_rank`, the SVD of a factored product in
:mod:`svdkit.core.linalg_lowrank`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def gram_eigenvalues(weight: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """λ_i = σ_i(W)², descending, of an (m, n) matrix, computed in ``dtype`` and returned in fp64.

    The eigenvalues of the q×q Gram matrix (q = min(m, n)): WᵀW for a tall W, WWᵀ for a wide one: one GEMM
    and ``eigvalsh`` of a q×q matrix, several times cheaper than ``svdvals`` of the m×n one. In fp64 the
    eigenvalues are accurate to ~1e-16·λ₁; in fp32 (twice as fast again, and no fp64 copy of W) to ~1e-7·λ₁,
    which moves the power-law α of the default model's matrices by < 1e-3 (benchmarks/inspect.py). Negative
    round-off values are clamped to 0.
    """
    if weight.ndim != 2:
        raise ValueError(f"gram_eigenvalues expects a matrix, got a tensor of shape {tuple(weight.shape)}.")
    W = weight.detach().to(dtype)
    G = W.mT @ W if W.shape[-2] >= W.shape[-1] else W @ W.mT
    return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0.0).to(torch.float64)
