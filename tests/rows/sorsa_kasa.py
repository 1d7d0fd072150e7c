"""SORSA, Effort, KaSA: r(m + n + 1) trainable parameters per matrix; SoMA: r(m + n). KaSA changes the
function at init by design: its row carries W − U_tail Σ_tail V_tailᵀ, the r smallest components removed."""

import torch

from rows import Row


def with_diagonal(W, cfg, bias):
    """U (m×r), σ (r), V (n×r) trainable: r(m + n + 1)."""
    return cfg.rank * (W.shape[0] + W.shape[1] + 1)


def kasa_truncated(W, cfg, name):
    """The weight KaSA prescribes at init, by an independent fp64 SVD: W minus its t smallest triplets,
    t = r ("paper") or the released code's r − (in − out) clipped to [0, r] (it keeps in − r components)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    out, inp = W.shape
    t = cfg.rank if cfg.truncate == "paper" else max(0, min(cfg.rank, min(out, inp) - (inp - cfg.rank)))
    if t == 0:
        return W
    tail = U[:, -t:] @ torch.diag(S[-t:]) @ Vh[-t:, :]
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
    Row("kasa", dict(rank=4, truncate="paper"), params=with_diagonal, init_weight=kasa_truncated, id="kasa-paper"),
    Row("soma", dict(rank=4)),
]
