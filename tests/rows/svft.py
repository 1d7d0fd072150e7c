"""SVFT (METHODS.md §6): p trainable entries of M plus one gate per matrix; the default kaiming init (the
official code's) changes W by s·σ(0)·U M₀ Vᵀ = ½·s·U M₀ Vᵀ by design, ``init="zero"`` preserves the function;
``svd_rank`` = t (§6b) keeps the top-t triplets and drops the tail.

The references here (sign-fixed SVD, band positions, kaiming M₀) are written from the paper's formulas and
the documented conventions, not from svdkit's helpers; tests/test_zoo_svft.py reuses them.
"""

import math

import torch

from rows import Row
from svdkit.core.linalg import layer_seed


def reference_svd(W: torch.Tensor, dtype=torch.float64):
    """Thin SVD W = U diag(S) Vᵀ with the largest-|entry| of each left singular vector made positive."""
    U, S, Vh = torch.linalg.svd(W.to(dtype), full_matrices=False)
    for i in range(U.shape[1]):
        if U[U[:, i].abs().argmax(), i] < 0:
            U[:, i], Vh[i] = -U[:, i], -Vh[i]
    return U, S, Vh


def banded(k: int, d: int) -> list[tuple[int, int]]:
    """(i, j) with |i − j| ≤ d, row-major."""
    return [(i, j) for i in range(k) for j in range(k) if abs(i - j) <= d]


def entries(W, cfg) -> int:
    """p of METHODS.md §6 (c) for one matrix; the band capped at k − 1 and p at k² as documented."""
    k = min(W.shape)
    if cfg.pattern == "plain":
        return k
    if cfg.num_entries is not None:
        return min(cfg.num_entries, k * k)
    d = min(16 if cfg.bands is None else cfg.bands, k - 1)
    return k * (2 * d + 1) - d * (d + 1)


def kaiming_init(W, cfg, name):
    """U_t(Σ_t + s·σ(0)·M₀)V_tᵀ: W + s·½·U M₀ Vᵀ, M₀ on the diagonal (plain) or the band with values
    √(2/p)·N(0, 1) from the layer's seeded generator; with ``svd_rank`` = t the tail beyond t is dropped."""
    U, S, Vh = reference_svd(W)
    k = U.shape[1] if cfg.svd_rank is None else cfg.svd_rank
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    pos = [(i, i) for i in range(k)] if cfg.pattern == "plain" else banded(k, cfg.bands)
    values = torch.randn(len(pos), generator=torch.Generator().manual_seed(layer_seed(cfg.seed, name)))
    M0 = torch.zeros(k, k, dtype=torch.float64)
    for (i, j), v in zip(pos, values.double() * math.sqrt(2.0 / len(pos))):
        M0[i, j] = v
    return (U @ (torch.diag(S) + cfg.scaling * 0.5 * M0) @ Vh).to(W.dtype)


def truncated_params(W, cfg, bias):
    return cfg.svd_rank + 1  # plain: t diagonal entries + the gate


def params(W, cfg, bias):
    return entries(W, cfg) + 1  # + the gate


ROWS = [
    Row("svft", dict(), params, kaiming_init, id="svft-plain-kaiming-default"),
    Row("svft", dict(init="zero"), params, id="svft-plain"),
    Row("svft", dict(pattern="banded", bands=1, init="zero"), params, id="svft-banded"),
    Row("svft", dict(pattern="random", num_entries=6, init="zero"), params, id="svft-random"),
    Row("svft", dict(pattern="top-k", num_entries=6, init="zero"), params, id="svft-top-k"),
    Row("svft", dict(pattern="banded", bands=1, init="kaiming"), params, kaiming_init, id="svft-kaiming"),
    Row("svft", dict(svd_rank=3), truncated_params, kaiming_init, id="svft-truncated"),
]
ROWS.append(Row("svft", dict(pattern="banded", bands=1, fold=True, init="zero"), params, id="svft-fold-weightless"))
