"""SODA (Kronecker rotations of both singular bases + Δσ), Lingo and BiLoRA (P diag(λ) Q triplets).

SODA trains k + 2(k₁² + k₂²) values per matrix, k = min(m, n), k₁ = the divisor of k closest to √k (the
smaller on a tie) or ``factor``; its update is full-rank (merged export). Lingo and BiLoRA train r(m + n + 1);
λ = 0 at init, so all three preserve the function exactly at init."""

import math

from rows import Row


def _divisor_near_root(k: int) -> int:
    return sorted((d for d in range(1, k + 1) if k % d == 0), key=lambda d: (abs(d - math.sqrt(k)), d))[0]


def soda_params(W, cfg, bias) -> int:
    k = min(W.shape)
    k1 = cfg.factor or _divisor_near_root(k)
    return k + 2 * (k1**2 + (k // k1) ** 2)


def triplets(W, cfg, bias) -> int:
    return cfg.rank * (W.shape[0] + W.shape[1] + 1)


ROWS = [
    Row("soda", params=soda_params),
    Row("soda", dict(factor=2, alpha=2.0), params=soda_params, id="soda-factor-alpha"),
    Row("lingo", dict(rank=4, target_r=2), params=triplets),
    Row("lingo", dict(rank=3, target_r=1, alpha=6.0, overrides={"k_proj|v_proj|key|value": {"rank": 2}}), params=triplets,
        id="lingo-overrides"),
    Row("bilora", dict(rank=4), params=triplets),
    Row("bilora", dict(rank=2, alpha=4.0, split_fraction=0.5, inner_steps=3), params=triplets, id="bilora-alpha"),
]
