"""CART, centred arithmetic with rank reduction (Choi et al., "Revisiting Weight Averaging for Model
Merging", https://arxiv.org/abs/2412.12153).

Weight averaging makes the task vectors centred on the average; their low-rank parts carry the task
knowledge and the rest is interference. Per matrix:

    Δ̄ = (1/T) Σ_t w_t Δ_t,   τ̃_t = w_t Δ_t − Δ̄,   Δ = Δ̄ + λ Σ_t SVD_k(τ̃_t),   k = ⌈ρ·r⌉,

θ = θ₀ + Δ (λ = ``alpha``, ρ = ``rank_fraction``). ρ = 0.08 follows the paper's "around 8 % of the rank";
λ = 1 is our data-free default. At full rank (ρ = 1) the centred vectors sum to 0 and CART is weight
averaging for any λ: the truncation is what keeps each task's dominant directions. Non-matrix tensors take
Δ̄ (the weight average).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from svdkit.core.linalg_merge import low_rank
from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_alpha, check_fraction, check_svd_dtype, per_tensor, weighted, weighted_mean


def cart_merge(deltas: list[Tensor], weights: list[float], rank_fraction: float, lam: float) -> Tensor:
    """Δ̄ + λ Σ_t SVD_k(w_t Δ_t − Δ̄)."""
    mean = weighted_mean(deltas, weights)
    k = math.ceil(rank_fraction * min(deltas[0].shape))
    return mean + lam * sum(low_rank(d - mean, k) for d in weighted(deltas, weights))


@register
@dataclass(frozen=True)
class Cart:
    """Weight average plus λ × rank-⌈ρr⌉ approximations of the centred task vectors."""

    name: ClassVar[str] = "cart"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2412.12153"
    summary: ClassVar[str] = "weight average + λ·low-rank of the centred task vectors"
    min_models: ClassVar[int] = 2
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = False

    alpha: float = 1.0
    rank_fraction: float = 0.08
    svd_dtype: str = "float32"

    def __post_init__(self):
        check_alpha(self)
        check_fraction(self, "rank_fraction")
        check_svd_dtype(self)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        return per_tensor(deltas, weights, lambda: cart_merge(deltas, weights, self.rank_fraction, self.alpha), 1.0)
