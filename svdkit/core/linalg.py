"""The SVD engine: pure functions, tensors in and tensors out.

Every function takes matrices shaped ``(..., m, n)`` (a leading batch of same-shaped matrices is
allowed) stored the way ``nn.Linear.weight`` stores them (m = out, n = in), computes in fp32 or fp64
whatever the storage dtype, and returns factors in the compute dtype:

    W ≈ U diag(S) Vh,   U: (..., m, r),  S: (..., r),  Vh: (..., r, n),  S descending.

Nothing here knows about modules, configs or names beyond using a name in error messages.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Sequence

import torch
from torch import Tensor

Which = Literal["top", "bottom"]


def check_matrix(weight: Tensor, name: str = "weight") -> None:
    """Raise a specific error for weights the engine cannot decompose (integer/quantized, non-finite)."""
    if not torch.is_floating_point(weight):
        raise TypeError(
            f"{name}: weight has dtype {weight.dtype}, not a float type. Quantized or integer weights "
            "cannot be decomposed: dequantize the model (load it in float32/bfloat16) before adapting."
        )
    if weight.ndim < 2:
        raise ValueError(f"{name}: expected a matrix, got a tensor of shape {tuple(weight.shape)}.")
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"{name}: weight of shape {tuple(weight.shape)} has {bad} NaN/Inf entries; "
            "an SVD of it is meaningless. Check the checkpoint or exclude this module."
        )


def layer_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one layer: the same (seed, name) gives the same seed on every machine."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype, device) -> Tensor:
    """Standard normal tensor of shape ``(len(seeds), *shape)``, slice i drawn from its own CPU generator.

    Drawing on the CPU makes the sketch identical on every device.
    """
    out = torch.empty(len(seeds), *shape, dtype=dtype)
    for i, s in enumerate(seeds):
        out[i].normal_(generator=torch.Generator().manual_seed(int(s)))
    return out.to(device)


def fix_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Sign convention: the largest-magnitude entry of each left singular vector is positive.

    Flipping u_i and v_i together leaves u_i σ_i v_iᵀ unchanged, so this only removes the ambiguity.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, r)
    signs = torch.gather(U, -2, idx).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.transpose(-1, -2)


def _select(U: Tensor, S: Tensor, Vh: Tensor, rank: int, which: Which):
    sl = slice(0, rank) if which == "top" else slice(S.shape[-1] - rank, S.shape[-1])
    return U[..., :, sl], S[..., sl], Vh[..., sl, :]


def _check_rank(shape, rank: int) -> None:
    k = min(shape[-2], shape[-1])
    if not 0 < rank <= k:
        raise ValueError(f"rank {rank} is out of range for a {shape[-2]}×{shape[-1]} matrix (1..{k}).")


def svd_exact(
    weight: Tensor, rank: int, which: Which = "top", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact thin SVD (LAPACK/cuSOLVER), top-r or bottom-r triplets, sign-fixed.

    Wide matrices are decomposed as their transpose (about 1.5× faster), which does not change the result.
    """
    _check_rank(weight.shape, rank)
    W = weight.to(dtype)
    wide = W.shape[-2] < W.shape[-1]
    if wide:
        W = W.transpose(-1, -2)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, Vh = _select(U, S, Vh, rank, which)
    if wide:
        U, Vh = Vh.transpose(-1, -2), U.transpose(-1, -2)
    return _signed(U, S, Vh)


def _signed(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    U, Vh = fix_signs(U, Vh)
    return U.contiguous(), S.contiguous(), Vh.contiguous()


def _tall_batch(weight: Tensor, rank: int, seeds: Sequence[int], dtype: torch.dtype):
    """(W as a (b, m ≥ n) batch in ``dtype``, whether a batch dim was added, whether W was transposed)."""
    _check_rank(weight.shape, rank)
    W = weight.to(dtype)
    squeeze = W.ndim == 2
    if squeeze:
        W = W.unsqueeze(0)
    if len(seeds) != W.shape[0]:
        raise ValueError(f"need one seed per matrix: got {len(seeds)} seeds for {W.shape[0]} matrices.")
    wide = W.shape[-2] < W.shape[-1]
    return (W.mT if wide else W), squeeze, wide


def _untall(U: Tensor, S: Tensor, Vh: Tensor, squeeze: bool, wide: bool):
    """Undo :func:`_tall_batch` on the factors, and fix their signs."""
    if wide:
        U, Vh = Vh.mT, U.mT
    U, S, Vh = _signed(U, S, Vh)
    return (U[0], S[0], Vh[0]) if squeeze else (U, S, Vh)


def _orth(x: Tensor) -> Tensor:
    return torch.linalg.qr(x).Q


def _orth_fast(Y: Tensor) -> Tensor:
    """An orthonormal basis of span(Y) by CholeskyQR: Y R⁻¹ with RᵀR = YᵀY (two GEMMs and an l×l
    Cholesky, ~2.5× faster than Householder QR for tall-skinny Y). Falls back to Householder QR when
    YᵀY is not numerically positive definite (rank-deficient Y)."""
    L, info = torch.linalg.cholesky_ex(Y.mT @ Y)
    if bool((info != 0).any()):
        return _orth(Y)
    return torch.linalg.solve_triangular(L.mT, Y, upper=True, left=False)


def svd_randomized(
    weight: Tensor,
    rank: int,
    seeds: Sequence[int],
    niter: int = 4,
    oversample: int = 8,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r randomized SVD with oversampling and QR-stabilized power (subspace) iterations.

    Halko, Martinsson & Tropp 2011 (https://arxiv.org/abs/0909.4061), Alg. 4.4 + 5.1: with l = r + p,
    Q = orth(W Ω), then ``niter`` times Q = orth(W orth(Wᵀ Q)); finally the exact SVD of the small
    l×n matrix Qᵀ W gives W ≈ (Q Ũ) S Vh. Expected error ≈ σ_{r+1}·(1 + O((σ_{l+1}/σ_{r+1})^{2q+1})).
    The intermediate orthonormalizations only need to keep the span, so they use CholeskyQR.

    ``weight`` is ``(m, n)`` or ``(b, m, n)``; ``seeds`` gives one seed per matrix (see :func:`layer_seed`).
    """
    W, squeeze, wide = _tall_batch(weight, rank, seeds, dtype)
    Wt = W.mT
    n = W.shape[-1]
    width = min(rank + oversample, n)
    Q = _orth_fast(W @ gaussian((n, width), seeds, dtype, W.device))  # (b, m, l)
    for _ in range(niter):
        Q = _orth_fast(W @ _orth_fast(Wt @ Q))
    Q = _orth_fast(Q)  # CholeskyQR2: a second pass makes Q orthonormal to working precision
    # SVD of the small l×n matrix Qᵀ W, taken as its tall transpose (≈3× faster in LAPACK)
    Vt, S, Ubt = torch.linalg.svd(Wt @ Q, full_matrices=False)  # (b,n,l) (b,l) (b,l,l)
    U = Q @ Ubt.mT[..., :rank]
    return _untall(U, S[..., :rank], Vt.mT[..., :rank, :], squeeze, wide)


def svd_bottom_randomized(
    weight: Tensor,
    rank: int,
    seeds: Sequence[int],
    niter: int = 4,
    oversample: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bottom-r singular triplets by randomized block inverse iteration (always fp64).

    The bottom right singular vectors of W (m ≥ n after transposing) are the top eigenvectors of
    G⁻¹ with G = WᵀW + μI. With one Cholesky factor of G (≈ mn² + n³/3 flops, versus ≈ 4mn² + 8n³ for
    a full SVD), ``niter`` QR-stabilized iterations Z = orth(G⁻¹ Z) converge on the bottom subspace;
    a Rayleigh–Ritz step (exact SVD of the m×l matrix W Z) returns the triplets. μ = 1e-12·tr(G) keeps
    G positive definite for rank-deficient W.
    """
    W, squeeze, wide = _tall_batch(weight, rank, seeds, torch.float64)
    n = W.shape[-1]
    width = min(rank + oversample, n)
    G = W.transpose(-1, -2) @ W
    mu = 1e-12 * G.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(1e-300)
    G = G + mu * torch.eye(n, dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky(G)
    Z = _orth(gaussian((n, width), seeds, torch.float64, W.device))
    for _ in range(max(1, niter)):
        Z = _orth(torch.cholesky_solve(Z, L))
    Ub, S, Vh_small = torch.linalg.svd(W @ Z, full_matrices=False)  # S: (b, l) descending
    return _untall(Ub[..., -rank:], S[..., -rank:], (Z @ Vh_small.mT).mT[..., -rank:, :], squeeze, wide)


def truncated_svd(
    weight: Tensor,
    rank: int,
    which: Which = "top",
    method: Literal["exact", "randomized"] = "exact",
    seeds: Sequence[int] | None = None,
    niter: int = 4,
    oversample: int = 8,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch to the exact or randomized routine; ``weight`` may be a batch ``(b, m, n)``.

    Bottom-r triplets with a randomized method use :func:`svd_bottom_randomized`.
    """
    if method == "exact":
        return svd_exact(weight, rank, which, dtype)
    if method != "randomized":
        raise ValueError(f"unknown SVD method {method!r}; use 'exact' or 'randomized'.")
    if seeds is None:
        raise ValueError("randomized SVD needs seeds (one per matrix) for reproducibility.")
    if which == "top":
        return svd_randomized(weight, rank, seeds, niter, oversample, dtype)
    U, S, Vh = svd_bottom_randomized(weight, rank, seeds, niter, oversample)
    return U.to(dtype), S.to(dtype), Vh.to(dtype)


def balanced_factors(U: Tensor, S: Tensor, Vh: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Split U diag(S) Vh into B = U diag(√(S/s)) and A = diag(√(S/s)) Vh, so that s·B A = U diag(S) Vh.

    This is the residual-init split of PiSSA (https://arxiv.org/abs/2404.02948, Eq. 2–3) with
    PEFT's division of σ by the LoRA scaling s.
    """
    root = (S / scale).sqrt()
    return U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh


def relative_residual(weight: Tensor, approx: Tensor) -> float:
    """‖W − W_r‖_F / ‖W‖_F computed in fp64."""
    W = weight.double()
    return float(torch.linalg.matrix_norm(W - approx.double()) / torch.linalg.matrix_norm(W))


def pivoted_qr(weight: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """QR with column pivoting (Businger & Golub 1965, Householder): ``W[..., :, perm] = Q R``.

    At step j the trailing column with the largest remaining norm is swapped in and annihilated below
    the diagonal by a Householder reflector, so |R_jj| is that norm and ``|diag(R)|`` is non-increasing.
    Signs are fixed so that diag(R) ≥ 0. Returns Q (..., m, k) with orthonormal columns, R (..., k, n)
    upper-triangular and perm (..., n) (int64), k = min(m, n), in ``dtype``. W P = Q R with P = I[:, perm];
    W = Q (R Pᵀ), where column perm[c] of R Pᵀ is column c of R.
    """
    if weight.ndim < 2:
        raise ValueError(f"pivoted_qr expects a matrix, got a tensor of shape {tuple(weight.shape)}.")
    W = weight.to(dtype)
    if W.ndim == 2:
        return _pivoted_qr_2d(W)
    m, n = W.shape[-2:]
    parts = [_pivoted_qr_2d(w) for w in W.reshape(-1, m, n)]
    return tuple(torch.stack(p).reshape(*W.shape[:-2], *p[0].shape) for p in zip(*parts))  # type: ignore[return-value]


def _pivoted_qr_2d(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m, n = W.shape
    k = min(m, n)
    R = W.clone()
    perm = torch.arange(n, device=W.device)
    V = torch.zeros(m, k, dtype=W.dtype, device=W.device)  # Householder vectors (unit norm, or 0: identity)
    for j in range(k):
        norms = R[j:, j:].square().sum(0)  # remaining column norms², recomputed (no downdating drift)
        p = j + int(torch.argmax(norms))
        if p != j:
            R[:, [j, p]] = R[:, [p, j]]
            perm[[j, p]] = perm[[p, j]]
        v = R[j:, j].clone()
        v[0] += torch.where(v[0] < 0, -1.0, 1.0).to(v) * torch.linalg.vector_norm(v)  # v = x + sign(x₀)‖x‖e₁
        vnorm = torch.linalg.vector_norm(v)
        if vnorm > 0:
            v /= vnorm
            R[j:, j:] -= 2 * torch.outer(v, v @ R[j:, j:])
            V[j:, j] = v
    Q = torch.eye(m, k, dtype=W.dtype, device=W.device)
    for j in reversed(range(k)):  # Q = H_1 ⋯ H_k I[:, :k]; H_j only touches rows and columns ≥ j here
        v = V[j:, j]
        Q[j:, j:] -= 2 * torch.outer(v, v @ Q[j:, j:])
    R = torch.triu(R[:k])
    signs = torch.where(R.diagonal() < 0, -1.0, 1.0).to(R)
    return Q * signs, R * signs.unsqueeze(-1), perm
