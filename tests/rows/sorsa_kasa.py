"""SORSA, Effort, KaSA: r(m + n + 1) trainable parameters per matrix; SoMA: r(m + n). KaSA changes the
function at init by design: its row carries W − U_tail Σ_tail V_tailᵀ, the r smallest components removed."""

import torch

from rows import Row


def with_diagonal(W, cfg, bias):
    """U (m×r), σ (r), V (n×r) trainable: r(m + n + 1)."""
    return cfg.rank * (W.shape[0] + W.shape[1] + 1)


def kasa_truncated(W, cfg, name):
    """The weight KaSA prescribes at init, by an independent fp64 SVD: W minus its r smallest triplets."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r = cfg.rank
    tail = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:, :]
    return (W.double() - tail).to(W.dtype)


ROWS = [
    Row("sorsa", dict(rank=4), params=with_diagonal),
    Row("sorsa", dict(rank=4, alpha=8), params=with_diagonal, id="sorsa-alpha"),
    Row("sorsa", dict(rank=4, svd="randomized", niter=2), params=with_diagonal, id="sorsa-randomized"),
    Row("effort", dict(rank=1), params=with_diagonal, id="effort-r1"),
    Row("effort", dict(rank=2), params=with_diagonal, id="effort-r2"),
    Row("effort", dict(rank=2, orth_weight=1.0, norm_weight=1.0), params=with_diagonal, id="effort-regularized"),
    Row("kasa", dict(rank=4), params=with_diagonal, init_weight=kasa_truncated),
    Row("kasa", dict(rank=4, alpha=8, fold=True), params=with_diagonal, init_weight=kasa_truncated, id="kasa-fold"),
    Row("soma", dict(rank=4)),
]
