"""Structured decompositions: Kronecker-product SVD, Nyström, Cayley rotations, per-head QR and SVD.

Pure functions, tensors in and tensors out; matrices in ``nn.Linear.weight`` layout (m = out, n = in).
Methods that use them: SoKA (Kronecker), NLoRA/IntTune (Nyström), Spectral Adapter^R (Cayley),
CLOVER (per head). Nothing here knows about modules or configs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from svdkit.core.linalg import fix_signs, svd_exact
from svdkit.core.linalg_lowrank import factored_svd
from svdkit.core.linalg_qr import qr_positive


# -- Kronecker-product SVD (Van Loan & Pitsianis 1993) ---------------------------------------------------
# For W (m × n) with m = m1·m2, n = n1·n2, the rearrangement ℛ(W) (m1·n1 × m2·n2) has row (i1, j1) = vec
# of the block W[i1-th block row, j1-th block column] (m2 × n2), so that ℛ(U ⊗ V) = vec(U) vec(V)ᵀ and
#     ℛ(W) = Σ_k σ_k u_k v_kᵀ (SVD)  ⇔  W = Σ_k σ_k U_k ⊗ V_k,  U_k = u_k as m1×n1, V_k = v_k as m2×n2.
def closest_divisor(k: int) -> int:
    """The divisor of k closest to √k (the smaller one on a tie): 576 → 24, 1536 → 32, 96 → 8."""
    root = math.sqrt(k)
    return min((d for d in range(1, k + 1) if k % d == 0), key=lambda d: (abs(d - root), d))


def rearrange(W: Tensor, m1: int, n1: int) -> Tensor:
    """ℛ(W): (..., m1·m2, n1·n2) → (..., m1·n1, m2·n2), row i1·n1 + j1 = the flattened block (i1, j1)."""
    *lead, m, n = W.shape
    m2, n2 = m // m1, n // n1
    blocks = W.reshape(*lead, m1, m2, n1, n2).transpose(-3, -2)  # (..., m1, n1, m2, n2)
    return blocks.reshape(*lead, m1 * n1, m2 * n2)


def unrearrange(M: Tensor, m1: int, n1: int, m2: int, n2: int) -> Tensor:
    """Inverse of :func:`rearrange`: (..., m1·n1, m2·n2) → (..., m1·m2, n1·n2)."""
    *lead, _, _ = M.shape
    return M.reshape(*lead, m1, n1, m2, n2).transpose(-3, -2).reshape(*lead, m1 * m2, n1 * n2)


def kron_rearranged(sigma: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """ℛ(Σ_k σ_k U_k ⊗ V_k) = Σ_k σ_k vec(U_k) vec(V_k)ᵀ: one (m1n1 × R)·(R × m2n2) product.

    σ (R,), U (R, m1, n1), V (R, m2, n2) → (m1·n1, m2·n2).
    """
    R = U.shape[0]
    return (U.reshape(R, -1) * sigma[:, None]).T @ V.reshape(R, -1)


def kron_sum(sigma: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Σ_k σ_k U_k ⊗ V_k for σ (R,), U (R, m1, n1), V (R, m2, n2), as a dense (m1·m2 × n1·n2) matrix."""
    return unrearrange(kron_rearranged(sigma, U, V), *U.shape[1:], *V.shape[1:])


def kpsvd(W: Tensor, m1: int, n1: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Full Kronecker-product SVD of one (m × n) matrix: σ (K,), U (K, m1, n1), V (K, m2, n2), σ descending.

    K = min(m1·n1, m2·n2); W = Σ_k σ_k U_k ⊗ V_k exactly, with the engine's sign convention on ℛ(W).
    """
    m, n = W.shape
    if m % m1 or n % n1:
        raise ValueError(f"kpsvd: factors ({m1}, {n1}) do not divide the {m}×{n} matrix.")
    m2, n2 = m // m1, n // n1
    M = rearrange(W.to(dtype), m1, n1)  # (m1·n1, m2·n2)
    u, S, vh = svd_exact(M, min(M.shape), "top", dtype)
    return S, u.T.reshape(-1, m1, n1), vh.reshape(-1, m2, n2)


# -- Nyström (Williams & Seeger 2001; NLoRA, https://arxiv.org/abs/2502.14482) ---------------------------
def nystrom_pinv(corner: Tensor) -> Tensor:
    """W[:r, :r]⁺ of the (..., r, r) corners, taken in float64 on the CPU (tiny; the corner can be
    ill-conditioned, and this makes it the same on every device), returned in the corners' dtype."""
    return torch.linalg.pinv(corner.detach().cpu().double()).to(device=corner.device, dtype=corner.dtype)


def contiguous_copy(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of a slice of a (possibly transposed, e.g. Conv1D) weight: never a view of it, and
    laid out as save/load will lay it out, so a reloaded adapter computes bit-identical outputs."""
    return t.to(dtype).clone(memory_format=torch.contiguous_format)


def nystrom(weights: Tensor, rank: int, core: str = "pinv", dtype: torch.dtype = torch.float32):
    """The Nyström sketch of W from its first r columns and rows: W ≈ C N R.

    weights (..., m, n) → C = W[:, :r] (..., m, r), N (..., r, r), R = W[:r, :] (..., r, n), all contiguous
    copies in ``dtype``; N = W[:r, :r]⁺ (``core="pinv"``, the Nyström formula: exact when rank W ≤ r and
    the corner has rank W) or N = W[:r, :r] (``core="slice"``).
    """
    if core not in ("pinv", "slice"):
        raise ValueError(f"nystrom: core must be 'pinv' or 'slice', got {core!r}.")
    r = rank
    C, R, corner = (contiguous_copy(t, dtype) for t in (weights[..., :, :r], weights[..., :r, :], weights[..., :r, :r]))
    return C, (corner if core == "slice" else nystrom_pinv(corner)), R


# -- Cayley map -------------------------------------------------------------------------------------------
def skew(entries: Tensor, r: int) -> Tensor:
    """The r×r skew-symmetric K whose strict upper triangle (row-major) is ``entries`` (r(r−1)/2 values)."""
    i, j = torch.triu_indices(r, r, 1, device=entries.device)
    upper = torch.zeros(r, r, dtype=entries.dtype, device=entries.device).index_put((i, j), entries)
    return upper - upper.T


def cayley(K: Tensor) -> Tensor:
    """Q = (I − K)(I + K)⁻¹, orthogonal for skew-symmetric K (the two factors commute). K: (..., r, r)."""
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    return torch.linalg.solve(eye + K, eye - K)


def skew_part(X: Tensor) -> Tensor:
    """½(X − Xᵀ) over the last two dims."""
    return 0.5 * (X - X.mT)


def orthogonal_tangent(R: Tensor, G: Tensor) -> Tensor:
    """The projection of G onto the tangent space of the orthogonal group at R (RᵀR = I): R·skew(RᵀG)."""
    return R @ skew_part(R.mT @ G)


def cayley_retract(R_old: Tensor, R_new: Tensor) -> Tensor:
    """Cayley retraction of the step R_new − R_old onto the orthogonal group at R_old (square R_old, RᵀR = I).

    The step's tangent part is R_old·Ω with Ω = skew(R_oldᵀ(R_new − R_old)); the result is
    R_old·(I + Ω/2)(I − Ω/2)⁻¹ = R_old·cayley(−Ω/2), orthogonal to rounding and = R_old + R_old·Ω + O(‖Ω‖²).
    """
    return R_old @ cayley(-0.5 * skew_part(R_old.mT @ (R_new - R_old)))


def kron_right_t(M: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """M (A ⊗ B)ᵀ for M (p × k1·k2), A (k1 × k1), B (k2 × k2), without forming A ⊗ B: p·k1·k2·(k1 + k2) products."""
    p, k1, k2 = M.shape[0], A.shape[0], B.shape[0]
    return torch.einsum("iab,ca,db->icd", M.reshape(p, k1, k2), A, B).reshape(p, k1 * k2)


# -- per-head factorizations (CLOVER, https://arxiv.org/abs/2411.17426) ---------------------------------
def head_qr(weights: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-head QR of W_jᵀ for (b, m, n) weights split into heads of ``block`` rows (W_j: d × n).

    Returns Q (b, h, n, d) with orthonormal columns and R (b, h, d, d) upper triangular with a
    non-negative diagonal (the unique sign convention, :func:`qr_positive`), so that W_j = R_jᵀ Q_jᵀ.
    """
    b, m, n = weights.shape
    heads = weights.reshape(b, m // block, block, n)  # W_j: (d × n)
    return qr_positive(heads.mT)  # W_jᵀ (n × d) = Q_j R_j


def head_product_svd(Wo: Tensor, Wv: Tensor, block: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per head h the thin SVD of M_h = W_o[:, h] W_v[h] (W_o: n_o × m, W_v: m × n_v, heads of ``block``).

    M_h has rank ≤ d, so it is never formed: :func:`svdkit.core.linalg_lowrank.factored_svd` of the head's
    factors (QR of each, SVD of the d×d core; O(n·d²) per head instead of the n×n SVD). Returns U (h, n_o, d),
    S (h, d) descending, Vh (h, d, n_v), signs fixed. Computes in the inputs' dtype.
    """
    heads = Wv.shape[0] // block
    return factored_svd(Wo.reshape(Wo.shape[0], heads, block).transpose(0, 1), Wv.reshape(heads, block, Wv.shape[1]))


def block_diagonal(blocks: Tensor) -> Tensor:
    """blockdiag(B_1, …, B_h) of an (h, d, d) stack, as a dense (h·d × h·d) matrix."""
    return torch.block_diag(*blocks.unbind(0))
