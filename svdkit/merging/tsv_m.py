"""Task Singular Vectors: merging, TSV-M (Gargiulo et al., CVPR 2025, https://arxiv.org/abs/2412.00081).

Per matrix, with T tasks and r = min(m, n):

1. Δ_t = U_t Σ_t V_tᵀ; keep each task's top k = max(1, ⌊f·r⌋) triplets, f = ``rank_fraction``
   (default 1/T, the paper's and official code's choice: together the tasks fill the rank);
2. stack U = [U_1,k … U_T,k] (m × Tk), σ = [σ_1,k; …; σ_T,k], V = [V_1,k … V_T,k] (n × Tk);
3. decorrelate: U⊥ = polar(U), V⊥ = polar(V), the nearest matrices with orthonormal columns (Eq. 9;
   ``orthogonalize="whiten"`` uses X (XᵀX)^{-1/2} instead, the authors' second variant, equal for full
   column rank);
4. Δ = U⊥ diag(σ) V⊥ᵀ and θ = θ₀ + α Δ (no 1/T: α = 1 is the data-free default, FusionBench's too).

Triplets with σ = 0 (numerically: ``numerical_rank``) are left out: when Δ_t has rank < k (a LoRA
task) their singular vectors are arbitrary and would still move the polar factors of the others.
Per-task weights scale Δ_t before its SVD (FusionBench's list-α semantics). The official code's zero
padding of the stacks to r columns is omitted: the padded columns carry σ = 0 and do not change Δ.
Non-matrix tensors take the weighted mean of the deltas, scaled by α.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg_merge import numerical_rank, polar_factor, thin_svd, whitened
from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_alpha, check_choice, check_fraction, check_svd_dtype, per_tensor, weighted


def tsv_merge(deltas: list[Tensor], weights: list[float], rank_fraction: float | None = None, orthogonalize: str = "polar") -> Tensor:
    """U⊥ diag(σ) V⊥ᵀ from each task's top-⌊f·r⌋ singular triplets (f = 1/T by default); without α."""
    r = min(deltas[0].shape)
    k = max(1, int((rank_fraction if rank_fraction is not None else 1.0 / len(deltas)) * r))
    Us, Ss, Vs = [], [], []
    for d in weighted(deltas, weights):
        U, S, Vh = thin_svd(d)
        kt = min(k, numerical_rank(S, d.shape))  # σ = 0 triplets (a rank-deficient Δ_t, e.g. a LoRA) are arbitrary
        Us.append(U[:, :kt])
        Ss.append(S[:kt])
        Vs.append(Vh[:kt].mT)
    orth = polar_factor if orthogonalize == "polar" else whitened
    if sum(x.shape[1] for x in Us) == 0:
        return torch.zeros_like(deltas[0])
    U_perp, V_perp = orth(torch.cat(Us, 1)), orth(torch.cat(Vs, 1))
    return (U_perp * torch.cat(Ss)) @ V_perp.mT


@register
@dataclass(frozen=True)
class TsvM:
    """Top-⌊r/T⌋ singular triplets per task, stacked and orthogonalized (polar factor), scaled by ``alpha``."""

    name: ClassVar[str] = "tsv-m"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2412.00081"
    summary: ClassVar[str] = "task singular vectors: per-task top r/T triplets, stacked, polar-orthogonalized"
    min_models: ClassVar[int] = 2
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = False

    alpha: float = 1.0
    rank_fraction: float | None = None  # None: 1/T
    orthogonalize: str = "polar"  # "polar" | "whiten"
    svd_dtype: str = "float32"

    def __post_init__(self):
        check_alpha(self)
        check_fraction(self, "rank_fraction")
        check_choice(self, "orthogonalize", ("polar", "whiten"))
        check_svd_dtype(self)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        return per_tensor(deltas, weights, lambda: self.alpha * tsv_merge(deltas, weights, self.rank_fraction, self.orthogonalize), self.alpha)
