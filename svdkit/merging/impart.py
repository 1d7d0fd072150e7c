"""ImPart, importance-aware delta sparsification (Yang et al., ACL 2025, https://arxiv.org/abs/2504.13237).

Instead of dropping whole singular vectors (low-rank truncation) or random delta entries (DARE), ImPart
sparsifies each singular vector of Δ = U diag(σ) Vᵀ with a keep-ratio that grows with its importance σ_i:
p_i = min(1, c·(σ_i/σ₁)^β) (β = ``power``), entries of u_i and v_i kept by seeded Bernoulli(p_i) masks and
rescaled by 1/p_i, so E[Δ̂] = Δ. c is found by bisection so that the kept entries (plus one σ per kept
triplet) fill ``density`` × m × n parameters; a triplet whose expected kept entries fall below 1 is
dropped. The masks are seeded per (matrix name, ``seed``) (:func:`svdkit.core.linalg.layer_seed`).
Deviation: the paper's σ-to-ratio schedule is tuned per model; the power law here is our choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg import layer_seed
from svdkit.core.linalg_merge import thin_svd
from svdkit.core.registry import config_to_dict, register


def keep_ratios(sigma: Tensor, shape: tuple[int, int], budget: float, power: float) -> Tensor:
    """p_i = min(1, c (σ_i/σ₁)^β), 0 where p_i (m + n) < 1, with Σ p_i (m + n) + #kept ≈ budget."""
    m, n = shape
    if sigma.numel() == 0 or not sigma[0] > 0:
        return torch.zeros_like(sigma)
    rel = (sigma / sigma[0]) ** power

    def ratios(c: float) -> Tensor:
        p = (c * rel).clamp(max=1)
        return torch.where(p * (m + n) >= 1, p, torch.zeros_like(p))

    def params(c: float) -> float:
        p = ratios(c)
        return float((p * (m + n)).sum() + (p > 0).sum())

    lo, hi = 0.0, 1.0
    while params(hi) < budget and hi < 1e12 and float(ratios(hi).min()) < 1:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) <= budget else (lo, mid)
    return ratios(lo)


@register
@dataclass(frozen=True)
class ImPart:
    """Sparsify each singular vector of the delta with a keep-ratio that grows with σ, within ``density``."""

    name: ClassVar[str] = "impart"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2504.13237"
    summary: ClassVar[str] = "task-vector compression: importance-aware sparsity of singular vectors (compress_delta)"
    delta_compression: ClassVar[bool] = True

    density: float = 0.1  # kept parameters / (m·n)
    power: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"impart: density (kept parameters per delta entry) must be in (0, 1], got {self.density}.")
        if not self.power >= 0:
            raise ValueError(f"impart: power must be ≥ 0, got {self.power}.")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def compress(self, delta: Tensor, key: str = "") -> tuple[Tensor, dict]:
        """(Δ̂, stats: parameters kept per delta entry, triplets kept)."""
        U, S, Vh = thin_svd(delta.double())
        m, n = delta.shape
        p = keep_ratios(S, (m, n), self.density * m * n, self.power)
        kept = p > 0
        U, S, V, p = U[:, kept], S[kept], Vh[kept].mT, p[kept]
        g = torch.Generator().manual_seed(layer_seed(self.seed, key))
        mu = (torch.rand(U.shape, generator=g, dtype=U.dtype) < p).to(U.dtype)
        mv = (torch.rand(V.shape, generator=g, dtype=V.dtype) < p).to(V.dtype)
        approx = ((U * mu / p) * S) @ (V * mv / p).mT
        params = float(mu.sum() + mv.sum() + kept.sum())
        return approx.to(delta.dtype), {"params_per_entry": params / (m * n), "triplets": int(kept.sum())}
