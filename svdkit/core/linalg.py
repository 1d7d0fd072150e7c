"""The SVD engine: pure functions, tensors in and tensors out.

Every function takes matrices shaped ``(..., m, n)`` (a leading batch of same-shaped matrices is
allowed) stored the way ``nn.Linear.weight`` stores them (m = out, n = in), computes in fp32 or fp64
whatever the storage dtype, and returns factors in the compute dtype:

    W ≈ U diag(S) Vh,   U: (..., m, r),  S: (..., r),  Vh: (..., r, n),  S descending.

Nothing here knows about modules, configs or names beyond using a name in error messages. Also here: the
seeded initializers (``layer_seed``, ``layer_generator``, ``gaussian``, ``kaiming_uniform``). Siblings:
``linalg_qr`` (pivoted QR, QR with diag(R) ≥ 0), ``linalg_structured`` (Kronecker-product SVD, Nyström,
Cayley, per-head QR/SVD), ``linalg_rank`` (energy/elbow/effective ranks, principal angles, orthogonality),
``linalg_lowrank`` (SVD of a product B·A, truncation error), ``linalg_merge`` (merging), ``covariance``
(damping, whitening); ``svd_cache`` is the opt-in on-disk cache behind :func:`truncated_svd`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal, Sequence

import torch
from torch import Tensor

from svdkit.core import svd_cache

Which = Literal["top", "bottom"]
BOTTOM_TOL, BOTTOM_MAX_ITER = 1e-8, 300  # svd_bottom_randomized's convergence test (niter is the minimum)


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


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by :func:`layer_seed` (seed, name): the same draws on every machine."""
    return torch.Generator().manual_seed(layer_seed(seed, name))


def kaiming_uniform(
    shape: Sequence[int], fan_in: int, generator: torch.Generator, dtype: torch.dtype | None = None
) -> Tensor:
    """U(−1/√fan_in, 1/√fan_in) of ``shape``: ``nn.init.kaiming_uniform_(a=√5)``, nn.Linear's and PEFT's default.

    Drawn on the CPU from ``generator`` (one ``torch.rand`` call, so consecutive draws from one generator
    are reproducible), in ``dtype`` (None: torch's default dtype); fan_in = the input size of the matrix
    this shape initializes.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return torch.rand(tuple(shape), generator=generator, dtype=dtype) * (2 * bound) - bound


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
    tol: float | None = BOTTOM_TOL,
    max_iter: int = BOTTOM_MAX_ITER,
) -> tuple[Tensor, Tensor, Tensor]:
    """Bottom-r singular triplets by randomized block inverse iteration (always fp64).

    The bottom right singular vectors of W (m ≥ n after transposing) are the top eigenvectors of
    G⁻¹ with G = WᵀW + μI. With one Cholesky factor of G (≈ mn² + n³/3 flops, versus ≈ 4mn² + 8n³ for
    a full SVD), QR-stabilized iterations Z = orth(G⁻¹ Z) converge on the bottom subspace; a Rayleigh–Ritz
    step (exact SVD of the m×l matrix W Z) returns the triplets. μ = 1e-12·tr(G) keeps G positive definite
    for rank-deficient W.

    The j-th direction converges like (σ_{n−j+1}/σ_{n−l})^{2k} after k iterations, so a fixed count is not
    enough on bulk (noise-like) spectra, whose bottom singular values are close together: ``niter`` = 4 left
    a principal-angle cosine of 0.04 and a 6 % singular-value error for the bottom 16 of a 1536×576 Gaussian.
    So ``niter`` is the minimum; iteration continues until the bottom r Ritz values of G⁻¹ on span(Z)
    (the eigenvalues of Zᵀ G⁻¹ Z, free from the solve) change by ≤ ``tol`` relative between iterations
    (values converge like sin²θ, so 1e-8 leaves angles of ~1e-4 rad), or ``max_iter`` iterations (a warning).
    ``tol=None``: exactly ``niter`` iterations.
    """
    W, squeeze, wide = _tall_batch(weight, rank, seeds, torch.float64)
    n = W.shape[-1]
    width = min(rank + oversample, n)
    G = W.transpose(-1, -2) @ W
    mu = 1e-12 * G.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(1e-300)
    G = G + mu * torch.eye(n, dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky(G)
    Z = _orth(gaussian((n, width), seeds, torch.float64, W.device))
    last, done = None, max(1, niter) if tol is None else max(1, niter, max_iter)
    for k in range(done):
        Y = torch.cholesky_solve(Z, L)
        if tol is not None:  # Ritz values of G⁻¹ on span(Z), largest r (= the bottom of G)
            ritz = torch.linalg.eigvalsh(Z.mT @ Y)[..., -rank:]
            if last is not None and k + 1 >= niter and bool(((ritz - last).abs() <= tol * ritz.abs()).all()):
                Z = _orth(Y)
                break
            last = ritz
        Z = _orth(Y)
    else:
        if tol is not None:
            import warnings

            warnings.warn(f"bottom-{rank} randomized SVD did not converge in {done} iterations (relative change of "
                          f"the Ritz values > {tol:g}); the triplets may be inaccurate: use svd='exact'.", stacklevel=3)  # fmt: skip
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
    cache=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch to the exact or randomized routine; ``weight`` may be a batch ``(b, m, n)``.

    Bottom-r triplets with a randomized method use :func:`svd_bottom_randomized`. ``cache``: the opt-in
    on-disk cache of :mod:`svdkit.core.svd_cache` — None uses the one enabled by ``use_svd_cache`` or the
    ``SVDKIT_SVD_CACHE`` environment variable (none by default), a folder or ``SvdCache`` uses that one,
    False never caches. A hit returns the stored factors of the same bytes and parameters.
    """
    if method not in ("exact", "randomized"):
        raise ValueError(f"unknown SVD method {method!r}; use 'exact' or 'randomized'.")
    if method == "randomized" and seeds is None:
        raise ValueError("randomized SVD needs seeds (one per matrix) for reproducibility.")
    store = svd_cache.resolve(cache)
    if store is None:
        return _truncated_svd(weight, rank, which, method, seeds, niter, oversample, dtype)
    _check_rank(weight.shape, rank)
    W = weight if weight.ndim == 3 else weight.reshape(-1, *weight.shape[-2:])  # (b, m, n)
    if method == "randomized" and len(seeds) != W.shape[0]:
        raise ValueError(f"need one seed per matrix: got {len(seeds)} seeds for {W.shape[0]} matrices.")
    params = [_cache_params(rank, which, method, None if seeds is None else seeds[i], niter, oversample, dtype)
              for i in range(W.shape[0])]  # fmt: skip

    def misses(idx: list[int]):  # one call for the sub-batch of matrices not in the cache
        sub_seeds = None if seeds is None else [seeds[i] for i in idx]
        return _truncated_svd(W[idx], rank, which, method, sub_seeds, niter, oversample, dtype)

    U, S, Vh = store.decompose(W, params, misses)
    lead = weight.shape[:-2]
    return U.reshape(*lead, *U.shape[-2:]), S.reshape(*lead, S.shape[-1]), Vh.reshape(*lead, *Vh.shape[-2:])


def _cache_params(rank: int, which: str, method: str, seed, niter: int, oversample: int, dtype: torch.dtype) -> dict:
    """What determines one matrix's factors besides its bytes (exact: no seed or iteration counts)."""
    params = {"rank": rank, "which": which, "method": method, "dtype": str(dtype)}
    if method == "randomized":
        params.update(seed=int(seed), niter=niter, oversample=oversample)
        if which == "bottom":
            params.update(tol=BOTTOM_TOL, max_iter=BOTTOM_MAX_ITER)
    return params


def _truncated_svd(weight, rank, which, method, seeds, niter, oversample, dtype) -> tuple[Tensor, Tensor, Tensor]:
    if method == "exact":
        return svd_exact(weight, rank, which, dtype)
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


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The orthonormal DCT-II matrix D (n × n): ``D[k, i] = c_k cos(π (i + ½) k / n)``, c_0 = √(1/n),
    c_k = √(2/n); its rows are the cosine basis vectors, D Dᵀ = I. Built in fp64, returned in ``dtype``.
    (Makhoul's FFT evaluation of D x is only faster than this matmul for n in the thousands.)"""
    i = torch.arange(n, dtype=torch.float64)
    D = torch.cos(torch.pi * (i[None, :] + 0.5) * i[:, None] / n) * (2.0 / n) ** 0.5
    D[0] /= 2.0**0.5
    return D.to(dtype=dtype, device=device)
