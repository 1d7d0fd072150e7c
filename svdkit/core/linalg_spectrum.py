"""Eigenvalues of WᵀW without an SVD: the empirical spectral density of a weight.

Pure functions, tensors in and out (the companion of :mod:`svdkit.core.linalg`; ranks, effective rank and
principal angles live in :mod:`svdkit.core.linalg_rank`, the SVD of a factored product in
:mod:`svdkit.core.linalg_lowrank`).
"""

from __future__ import annotations

import torch
from torch import Tensor

GRAM_BLOCK = 128  # narrowest column block of lower_gram (narrower GEMMs lose more than the flops they save)


def lower_gram(weight: Tensor, blocks: int | None = None) -> Tensor:
    """The lower triangle of the q×q Gram matrix of an (m, n) matrix, q = min(m, n) (right of the diagonal blocks: 0).

    G = WᵀW for a tall W (m ≥ n), WWᵀ for a wide one. BLAS's symmetric rank-k update (SYRK) computes one
    triangle in half the flops, but torch does not expose it; so the columns of the tall view X (W or Wᵀ)
    are split into b blocks and block row i, up to and including its diagonal block, is one GEMM,
    G[i, :i] = X_iᵀ X_{:i}:
    (b + 1)/(2b) of the full product's flops (62.5 % for b = 4). ``blocks``: b (default q // 128, clamped
    to 1…8; on the default model's 576-wide Gram matrices, 1 thread, it takes 0.71× the CPU time of the
    full product). Meant for ``torch.linalg.eigvalsh``, which reads the lower triangle only.
    """
    if weight.ndim != 2:
        raise ValueError(f"lower_gram expects a matrix, got a tensor of shape {tuple(weight.shape)}.")
    X = weight if weight.shape[0] >= weight.shape[1] else weight.mT
    q = X.shape[1]
    b = max(1, min(8, q // GRAM_BLOCK)) if blocks is None else max(1, min(int(blocks), q))
    if b == 1:
        return X.mT @ X
    edges = [round(i * q / b) for i in range(b + 1)]
    G = X.new_zeros(q, q)
    for lo, hi in zip(edges[:-1], edges[1:]):
        G[lo:hi, :hi] = X[:, lo:hi].mT @ X[:, :hi]
    return G


def gram(weight: Tensor) -> Tensor:
    """The q×q Gram matrix of an (m, n) matrix (WᵀW if m ≥ n, else WWᵀ), correct at least in its lower triangle.

    On the CPU, through NumPy (a dependency of svdkit, imported here lazily): NumPy's matmul sends X.T @ X
    of one buffer to BLAS's SYRK, which computes one triangle in half the flops and mirrors it (on the
    default model, 1 thread: 0.7× the CPU time of :func:`lower_gram`, 0.5× the full torch product).
    Elsewhere (GPU), or for dtypes NumPy lacks, :func:`lower_gram`. Both sum the same m products per entry.
    """
    if weight.ndim != 2:
        raise ValueError(f"gram expects a matrix, got a tensor of shape {tuple(weight.shape)}.")
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64):
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy is a dependency
            return lower_gram(weight)
        X = weight.detach().numpy()
        X = X if X.shape[0] >= X.shape[1] else X.T
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are the caller's to handle
            return torch.from_numpy(X.T @ X)
    return lower_gram(weight)


def gram_eigenvalues(weight: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """λ_i = σ_i(W)², descending, of an (m, n) matrix, computed in ``dtype`` and returned in fp64.

    The eigenvalues of the q×q Gram matrix (q = min(m, n), :func:`gram`): one SYRK (or blocked GEMM) and
    ``eigvalsh`` of a q×q matrix, several times cheaper than ``svdvals`` of the m×n one. Squaring W makes
    the error absolute: |λ̂_i − λ_i| ≲ c·q·u·λ₁ (u the unit round-off of ``dtype``), so λ_i far below u·λ₁
    come out as noise. In fp64 that is ~1e-16·λ₁; in fp32 (about 2× faster again, and no fp64 copy of W)
    at most 8e-6·λ₁ on the default model, which moves its nuclear norm by ≤ 6e-6 relative and its
    power-law α by ≤ 5e-5 relative, except at a near-tie of the fit's KS minimum (BENCHMARKS.md, inspect
    section). Negative round-off values are clamped to 0.

    Non-finite input raises a ``ValueError`` naming the count of NaN/Inf entries; it is detected on the
    Gram diagonal (Σ_i w_ij², non-finite iff a column holds a NaN/Inf or overflows), so a finite W costs no
    extra pass. A finite W whose squares overflow ``dtype`` is recomputed in fp64.
    """
    if weight.ndim != 2:
        raise ValueError(f"gram_eigenvalues expects a matrix, got a tensor of shape {tuple(weight.shape)}.")
    if not torch.is_floating_point(weight):
        raise TypeError(f"gram_eigenvalues expects a float matrix, got dtype {weight.dtype}; dequantize it first.")
    W = weight.detach().to(dtype)
    G = gram(W)
    if not bool(torch.isfinite(G.diagonal()).all()):
        bad = int((~torch.isfinite(weight)).sum())
        if bad:
            raise ValueError(f"the {tuple(weight.shape)} matrix has {bad} NaN/Inf entries: its spectrum is undefined. "
                             "Check the checkpoint or exclude this module.")  # fmt: skip
        if dtype == torch.float64:
            raise ValueError(f"the {tuple(weight.shape)} matrix's squared entries overflow float64.")
        return gram_eigenvalues(weight, torch.float64)
    return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0.0).to(torch.float64)
