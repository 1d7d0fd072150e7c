"""SVFT (METHODS.md §6): p trainable entries of M plus one gate per matrix; zero init preserves the
function, the official code's kaiming init changes W by s·σ(0)·U M₀ Vᵀ = ½·s·U M₀ Vᵀ by design.

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


def kaiming_banded_init(W, cfg, name):
    """W + s·σ(0)·U M₀ Vᵀ, M₀ on the band with values √(2/p)·N(0, 1) from the layer's seeded generator."""
    U, _, Vh = reference_svd(W)
    k = U.shape[1]
    pos = banded(k, cfg.bands)
    values = torch.randn(len(pos), generator=torch.Generator().manual_seed(layer_seed(cfg.seed, name)))
    M0 = torch.zeros(k, k, dtype=torch.float64)
    for (i, j), v in zip(pos, values.double() * math.sqrt(2.0 / len(pos))):
        M0[i, j] = v
    return (W.double() + cfg.scaling * 0.5 * U @ M0 @ Vh).to(W.dtype)


def params(W, cfg, bias):
    return entries(W, cfg) + 1  # + the gate


ROWS = [
    Row("svft", dict(), params, id="svft-plain"),
    Row("svft", dict(pattern="banded", bands=1), params, id="svft-banded"),
    Row("svft", dict(pattern="random", num_entries=6), params, id="svft-random"),
    Row("svft", dict(pattern="top-k", num_entries=6), params, id="svft-top-k"),
    Row("svft", dict(pattern="banded", bands=1, init="kaiming"), params, kaiming_banded_init, id="svft-kaiming"),
]
ROWS.append(Row("svft", dict(pattern="banded", bands=1, fold=True), params, id="svft-fold-weightless"))
