"""Spectral Adapter (Zhang & Pilanci 2024, https://arxiv.org/abs/2405.13952): tune the top-r singular
vectors of W, additively (A) or by orthogonal rotations (R). With W = U Σ Vᵀ and the top-r block U_r Σ_r V_rᵀ:

    A:  W' = (U_r + ΔU) Σ_r (V_r + ΔV)ᵀ + U_{r:} Σ_{r:} V_{r:}ᵀ
    R:  W' = (U_r Q_U) Σ_r (V_r Q_V)ᵀ + U_{r:} Σ_{r:} V_{r:}ᵀ,  Q = (I − K)(I + K)⁻¹ (Cayley), K = −Kᵀ

The paper has no α scaling: with ``alpha=None`` the layer scaling is s = 1 and the update is exactly the
paper's; an explicit ``alpha`` scales the whole change W' − W by s = α/r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Core, Fixed
from svdkit.adapters.layers import Init
from svdkit.core.linalg import layer_seed, truncated_svd
from svdkit.core.linalg_structured import cayley, skew


def top_svd(cfg: AdapterConfig, weights: Tensor, names) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r (U_r, σ_r, V_rᵀ) of a batch of weights, exact or seeded randomized as the config asks."""
    seeds = [layer_seed(cfg.seed, name) for name in names]
    return truncated_svd(weights, cfg.rank, "top", cfg.svd, seeds, cfg.niter, cfg.oversample, cfg.dtype)


@register
@dataclass(frozen=True)
class SpectralAdapterA(AdapterConfig):
    """Spectral Adapter^A (https://arxiv.org/abs/2405.13952): W' = (U_r + ΔU) Σ_r (V_r + ΔV)ᵀ + tail.

    Here B = U_r and A = V_rᵀ train (B + ΔU, A + ΔVᵀ after training), Σ_r is a frozen core, and the
    frozen B₀A₀ = U_r Σ_r V_rᵀ is subtracted, so ΔW = (U_r + ΔU)Σ_r(V_r + ΔV)ᵀ − U_rΣ_rV_rᵀ (rank ≤ 2r).
    Defaults: r = 16 (paper: 8), s = 1, lr 1e-5. Weight decay 0 (the paper's 0.1 decays its zero-init
    ΔU, ΔV; here the trained tensors are U_r + ΔU, V_r + ΔV, and decay would shrink the singular vectors).
    """

    name = "spectral-a"
    lr = 1e-5
    basis = "weight SVD, top-r"
    trains = "U_r, V_r (additive; Σ_r frozen)"
    params = "r(m+n)"
    export_rank = "2r"
    paper = "https://arxiv.org/abs/2405.13952"

    def initialize(self, weights, names, calibration=None) -> Init:
        U, S, Vh = top_svd(self, weights, names)
        return Init(A=Vh, B=U, core={"value": S})  # subtract: B₀ = U_r Σ_r, A₀ = V_rᵀ

    core_type = Fixed


class CayleyCore(Core):
    """C = Q_U Σ_r Q_Vᵀ − Σ_r with Cayley rotations of trainable skew-symmetric K_U, K_V (zero at init).

    ``k_u``, ``k_v`` hold the strict upper triangles (r(r−1)/2 values each); ``sigma`` (Σ_r) is frozen.
    """

    def __init__(self, sigma: Tensor, k_u: Tensor, k_v: Tensor):
        super().__init__()
        self.register_buffer("sigma", sigma.detach().clone())
        self.k_u = nn.Parameter(k_u.detach().clone())
        self.k_v = nn.Parameter(k_v.detach().clone())

    def rotations(self) -> tuple[Tensor, Tensor]:
        r = self.sigma.shape[0]
        return cayley(skew(self.k_u, r)), cayley(skew(self.k_v, r))

    def forward(self) -> Tensor:
        Qu, Qv = self.rotations()
        return (Qu * self.sigma) @ Qv.T - torch.diag(self.sigma)

    def extra_repr(self) -> str:
        return f"rank {self.sigma.shape[0]}, Cayley rotations with {self.k_u.numel()} + {self.k_v.numel()} entries"


@register
@dataclass(frozen=True)
class SpectralAdapterR(AdapterConfig):
    """Spectral Adapter^R (https://arxiv.org/abs/2405.13952): U_r → U_r Q_U, V_r → V_r Q_V (Cayley).

    ΔW = U_r (Q_U Σ_r Q_Vᵀ − Σ_r) V_rᵀ with Q = (I − K)(I + K)⁻¹, K skew-symmetric r×r, K = 0 at init;
    U_r, V_rᵀ and Σ_r are frozen. Each K is stored as its strict upper triangle, r(r−1)/2 trainable
    values per side, r(r−1) per matrix (METHODS.md's [?] on r² per side: a full r×r storage would
    train r² values of which only the skew part r(r−1)/2 matters). Exports exactly as rank r
    (lora_B = U_r C). Defaults: r = 16 (paper: 8), s = 1, lr 1e-5, weight decay 0.1 (decays K toward
    the identity rotation).
    """

    name = "spectral-r"
    lr = 1e-5
    weight_decay = 0.1
    basis = "weight SVD, top-r"
    trains = "Cayley rotations of U_r, V_r"
    params = "r(r-1)"
    export_rank = "r"
    paper = "https://arxiv.org/abs/2405.13952"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 2:
            raise ValueError(f"SpectralAdapterR: rank must be >= 2 (a 1×1 rotation is the identity), got {self.rank}.")

    def initialize(self, weights, names, calibration=None) -> Init:
        U, S, Vh = top_svd(self, weights, names)
        zeros = torch.zeros(S.shape[0], self.rank * (self.rank - 1) // 2, dtype=S.dtype, device=S.device)
        return Init(A=Vh, B=U, trainable=frozenset(), subtract=False,
                    core={"sigma": S, "k_u": zeros, "k_v": zeros.clone()})  # fmt: skip

    core_type = CayleyCore
