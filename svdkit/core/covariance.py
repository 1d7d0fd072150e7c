"""Covariance math: pure functions, tensors in and tensors out (the one home for it).

Input covariances C (n × n, n = a layer's input features) come from :func:`svdkit.calibrate`. Data-aware
methods use them to orient a decomposition of W (m × n, ``nn.Linear`` layout): CorDA takes the SVD of
W·C̃ (https://arxiv.org/abs/2406.05223); SVD-LLM's whitening will reuse the damping here. Damping, inverse
and products are computed in float64 (the C̃⁻¹ step multiplies rounding errors by cond(C̃)). Nothing here
knows about modules or configs beyond using a name in messages.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor

from svdkit.core.linalg import Which, truncated_svd

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
