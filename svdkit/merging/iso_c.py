"""Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025, https://arxiv.org/abs/2502.04959).

Per matrix: Δ_TA = Σ_t w_t Δ_t = U Σ Vᵀ, σ̄ = mean of all r singular values (so ‖Δ‖_* is kept), and
Δ_Iso = σ̄ · U Vᵀ: the spectrum is flattened so no task's directions dominate. θ = θ₀ + α Δ_Iso.
When Δ_TA is rank-deficient (a sum of LoRAs) the mean and U Vᵀ run over its ρ non-zero singular values
only (``numerical_rank``): the σ = 0 directions are arbitrary, and the nuclear norm is still kept; for a
full-rank Δ_TA (the paper's case) this is the paper's rule. ``mean="geometric"`` uses exp(mean log σ) over the non-zero σ instead (the sd-mecha port's variant).
Non-matrix tensors take the weighted mean of the deltas, scaled by α. α = 1 is the data-free default
(FusionBench's); the paper tunes α on validation data (≈ 1.3–1.5 for ViT-B/32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg_merge import numerical_rank, thin_svd
from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_alpha, check_choice, check_svd_dtype, per_tensor, weighted


def spectrum_mean(S: Tensor, mean: str = "arithmetic") -> Tensor:
    if mean == "geometric":
        positive = S[S > 0]
        return positive.log().mean().exp() if positive.numel() else S.sum() * 0
    return S.mean()


def iso_merge(deltas: list[Tensor], weights: list[float], mean: str = "arithmetic") -> Tensor:
    """σ̄ · U Vᵀ of Σ_t w_t Δ_t; without α."""
    total = sum(weighted(deltas, weights))
    U, S, Vh = thin_svd(total)
    rho = numerical_rank(S, total.shape)
    if rho == 0:
        return torch.zeros_like(total)
    return spectrum_mean(S[:rho], mean) * (U[:, :rho] @ Vh[:rho])


@register
@dataclass(frozen=True)
class IsoC:
    """Flatten the spectrum of the summed task matrix to its mean singular value, scaled by ``alpha``."""

    name: ClassVar[str] = "iso-c"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2502.04959"
    summary: ClassVar[str] = "isotropic merge: Σ τ_t = UΣVᵀ ↦ mean(σ)·UVᵀ"
    min_models: ClassVar[int] = 2
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = False

    alpha: float = 1.0
    mean: str = "arithmetic"  # "arithmetic" (the paper) | "geometric"
    svd_dtype: str = "float32"

    def __post_init__(self):
        check_alpha(self)
        check_choice(self, "mean", ("arithmetic", "geometric"))
        check_svd_dtype(self)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        return per_tensor(deltas, weights, lambda: self.alpha * iso_merge(deltas, weights, self.mean), self.alpha)
