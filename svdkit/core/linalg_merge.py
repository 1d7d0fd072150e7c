"""Linear algebra of model merging: pure functions on task matrices, tensors in and tensors out.

A task matrix is Δ_t = W_t − W_0 stored as ``nn.Linear.weight`` stores it (m = out, n = in). Everything
computes in the dtype it is given (the merge engine passes fp32, or fp64 on request) and is deterministic:
SVDs are sign-fixed (:func:`svdkit.core.linalg.fix_signs`), random masks come from explicit generators.
"""

from __future__ import annotations

import torch
from torch import Tensor

from svdkit.core.linalg import fix_signs


def thin_svd(X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Full thin SVD X = U diag(S) Vh (U: m×k, S: k, Vh: k×n, k = min(m, n)), S descending, sign-fixed.

    Wide matrices are decomposed as their transpose (faster in LAPACK; the result is the same).
    """
    wide = X.shape[-2] < X.shape[-1]
    U, S, Vh = torch.linalg.svd(X.mT if wide else X, full_matrices=False)
    if wide:
        U, Vh = Vh.mT, U.mT
    U, Vh = fix_signs(U, Vh)
    return U, S, Vh


def numerical_rank(S: Tensor, shape: tuple[int, ...], reference: float | Tensor | None = None) -> int:
    """Singular values above max(m, n)·eps·σ_ref (numpy's ``matrix_rank`` rule); 0 for a zero matrix.
    σ_ref = σ₁ by default; pass ``reference`` when S belongs to a remainder (e.g. X − P X) whose own σ₁ may be
    pure rounding noise: relative to the matrix it came from, such a remainder has rank 0."""
    if S.numel() == 0 or not S[0] > 0:
        return 0
    ref = S[0] if reference is None else reference
    return int((S > ref * max(shape[-2:]) * torch.finfo(S.dtype).eps).sum())


def low_rank(X: Tensor, k: int) -> Tensor:
    """SVD_k(X) = U[:, :k] diag(S[:k]) Vh[:k] (the best rank-k approximation, Eckart–Young)."""
    U, S, Vh = thin_svd(X)
    k = max(0, min(k, S.shape[-1]))
    return (U[..., :k] * S[..., None, :k]) @ Vh[..., :k, :]


def polar_factor(X: Tensor) -> Tensor:
    """The orthogonal polar factor of X (m×k): X = P S Qᵀ (thin SVD) ↦ P Qᵀ.

    It is the matrix with orthonormal columns nearest to X in Frobenius norm (orthogonal Procrustes,
    Schönemann 1966), the orthogonalization TSV-M and Iso-CTS apply to their stacked singular vectors
    (https://arxiv.org/abs/2412.00081, Eq. 9). Zero columns (padding) stay orthogonal to the rest.
    """
    P, _, Qh = torch.linalg.svd(X, full_matrices=False)
    return P @ Qh


def whitened(X: Tensor, eps: float = 1e-12) -> Tensor:
    """X (XᵀX)^{-1/2} by an eigendecomposition (ZCA whitening): equal to :func:`polar_factor` when X has full
    column rank (the TSV authors' second variant); eigenvalues below ``eps`` are clamped."""
    evals, evecs = torch.linalg.eigh(X.mT @ X)
    return X @ (evecs * evals.clamp_min(eps).rsqrt().unsqueeze(-2)) @ evecs.mT


def singular_value_threshold(X: Tensor, tau: float) -> Tensor:
    """SVT_τ(X) = U diag(max(σ − τ, 0)) Vᵀ, the proximal operator of τ‖·‖_* (Cai, Candès & Shen 2010)."""
    U, S, Vh = thin_svd(X)
    return (U * (S - tau).clamp_min(0).unsqueeze(-2)) @ Vh


def magnitude_mask(x: Tensor, density: float) -> Tensor:
    """Boolean mask of the k = max(1, ⌊density·numel⌋) largest |x| entries (all for density ≥ 1, none for
    density ≤ 0). Ties at the threshold are broken by a stable sort on position, so the mask is deterministic
    and has exactly k entries (the per-tensor rule of mergekit's ``magnitude``)."""
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    if density <= 0 or x.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    k = max(1, int(density * x.numel()))
    order = torch.argsort(x.abs().reshape(-1).float(), descending=True, stable=True)[:k]
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[order] = True
    return mask.reshape(x.shape)


def bernoulli_mask(shape: torch.Size | tuple, density: float, generator: torch.Generator) -> Tensor:
    """Boolean keep-mask with P(keep) = density, drawn from ``generator`` on the CPU (the same draw as
    ``torch.bernoulli(torch.full(shape, density))`` after ``torch.manual_seed`` with the generator's seed)."""
    if density >= 1:
        return torch.ones(shape, dtype=torch.bool)
    return torch.bernoulli(torch.full(shape, float(density)), generator=generator).bool()


def elect_sign(stack: Tensor) -> Tensor:
    """TIES sign election ("mass"): γ = sign(Σ_t τ_t) over the leading task axis, with γ = +1 where the sum
    is 0 (mergekit's and the paper code's convention for ties)."""
    total = stack.sum(dim=0)
    return torch.where(total >= 0, torch.ones_like(total), -torch.ones_like(total))


def disjoint_mean(stack: Tensor, weights: Tensor) -> Tensor:
    """TIES disjoint merge: per entry, Σ_t w_t τ_t over the tasks whose (weighted) entry is non-zero and agrees
    with the elected sign, divided by Σ of those tasks' w_t (0 where no task agrees).

    ``stack`` holds the (already trimmed) task tensors on its first axis; ``weights`` one weight per task.
    """
    w = weights.to(stack.dtype).reshape(-1, *([1] * (stack.ndim - 1)))
    weighted = stack * w
    gamma = elect_sign(weighted)
    agree = weighted.sign() == gamma
    divisor = (w * agree).sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (weighted * agree).sum(dim=0) / divisor


def relative_error(reference: Tensor, approx: Tensor) -> float:
    """‖R − A‖_F / ‖R‖_F in fp64 (0 when R is 0 and A equals it)."""
    R = reference.double()
    denom = float(R.norm())
    diff = float((R - approx.double()).norm())
    return diff / denom if denom > 0 else diff


def quantize_vectors(X: Tensor, bits: Tensor) -> Tensor:
    """Fake-quantize each column of X (k columns) to ``bits[j]`` bits: symmetric round-to-nearest with one
    scale per column, s = max|x| / (2^{b−1} − 1) (b = 1 keeps only the sign: s = mean|x|); 0 bits → 0."""
    out = torch.zeros_like(X)
    for b in bits.unique().tolist():
        cols = bits == b
        if b <= 0:
            continue
        x = X[:, cols]
        if b == 1:
            out[:, cols] = x.sign() * x.abs().mean(0, keepdim=True)
            continue
        qmax = 2 ** (b - 1) - 1
        scale = x.abs().amax(0, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) / qmax
        out[:, cols] = (x / scale).round().clamp(-qmax, qmax) * scale
    return out


def triplet_errors(u: Tensor, qu: Tensor, v: Tensor, qv: Tensor) -> Tensor:
    """‖u vᵀ − q_u q_vᵀ‖_F² per column pair, from dot products (no m × n matrix):
    ‖u‖²‖v‖² + ‖q_u‖²‖q_v‖² − 2 (u·q_u)(v·q_v)."""
    uu, vv = (u * u).sum(0), (v * v).sum(0)
    qq = (qu * qu).sum(0) * (qv * qv).sum(0)
    return (uu * vv + qq - 2 * (u * qu).sum(0) * (v * qv).sum(0)).clamp_min(0)
