"""QR factorizations: column-pivoted (rank-revealing) QR and QR with a unique sign convention.

Pure functions, tensors in and tensors out, matrices stored as ``nn.Linear.weight`` stores them
(``(..., m, n)``, m = out, n = in). Used by QR-LoRA (pivoted) and CLOVER's per-head QR
(:func:`svdkit.core.linalg_structured.head_qr`); compression and the optimizers reuse them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def qr_positive(X: Tensor) -> tuple[Tensor, Tensor]:
    """Thin QR with a non-negative diagonal of R, the unique factorization of a full-column-rank X.

    X (..., m, k) = Q (..., m, k) R (..., k, k) with orthonormal columns Q; LAPACK's Householder QR leaves
    the signs of diag(R) arbitrary, so column j of Q and row j of R are flipped together where R_jj < 0
    (Q D · D R = Q R for D = diag(±1)). A zero R_jj keeps its sign (+1). Computes in X's dtype.
    """
    Q, R = torch.linalg.qr(X)  # (..., m, k), (..., k, k)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))  # (..., k)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return Q * signs.unsqueeze(-2), R * signs.unsqueeze(-1)


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
