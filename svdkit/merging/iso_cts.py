"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025,
https://arxiv.org/abs/2502.04959).

Per matrix with T tasks, r = min(m, n), f = ``common_fraction`` (0.8, the paper's default):

1. k = ⌊f·r⌋, then k ← r − round((r − k)/T)·T so the remaining r − k directions split evenly: s = (r − k)/T
   per task (the official code's adjustment);
2. common subspace: Δ_TA = Σ_t w_t Δ_t = U Σ Vᵀ, keep U_c = U[:, :k], σ_c, V_c;
3. per task, the part outside the common left subspace: Δ_t⊥ = Δ_t − U_c U_cᵀ Δ_t, and its top-s triplets;
4. stack [U_c, U_1,s … U_T,s] and [V_c, V_1,s … V_T,s], replace each by its polar factor;
5. isotropic spectrum: every σ ← mean of the stacked σ; Δ = σ̄ U⊥ V⊥ᵀ, θ = θ₀ + α Δ.

Directions with σ = 0 (a rank-deficient Δ_TA or Δ_t⊥, e.g. from LoRAs) are left out of the stacks, as in
:mod:`svdkit.merging.iso_c`; Δ_t⊥'s σ are judged against σ₁(Δ_TA), since a Δ_t⊥ that the common subspace
already spans (LoRA tasks, whose summed rank is below k) is rounding noise with a σ₁ of its own; with it
in the stack its near-zero σ would drag σ̄ down. For full-rank task matrices this is the paper's rule. Non-matrix tensors take
the weighted mean of the deltas, scaled by α.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg_merge import numerical_rank, polar_factor, thin_svd
from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_alpha, check_fraction, check_svd_dtype, per_tensor, weighted


def common_size(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(k, s): common directions and directions per task, with r − k divisible by T."""
    k = int(r * fraction)
    k = r - round((r - k) / tasks) * tasks
    k = max(1, min(k, r))
    return k, (r - k) // tasks


def iso_cts_merge(deltas: list[Tensor], weights: list[float], fraction: float = 0.8) -> Tensor:
    """σ̄ · polar([U_c, U_t,s…]) polar([V_c, V_t,s…])ᵀ; without α."""
    ws = weighted(deltas, weights)
    k, s = common_size(min(deltas[0].shape), len(deltas), fraction)
    U, S, Vh = thin_svd(sum(ws))
    k = min(k, numerical_rank(S, ws[0].shape))  # σ = 0 directions (rank-deficient sums) are arbitrary: left out
    Us, Ss, Vs = [U[:, :k]], [S[:k]], [Vh[:k].mT]
    if s > 0:
        Uc = U[:, :k]
        for d in ws:
            resid = d - Uc @ (Uc.mT @ d)
            Ut, St, Vht = thin_svd(resid)
            st = min(s, numerical_rank(St, resid.shape, reference=S[0]))  # a remainder at rounding level is rank 0
            Us.append(Ut[:, :st])
            Ss.append(St[:st])
            Vs.append(Vht[:st].mT)
    if sum(x.shape[1] for x in Us) == 0:
        return torch.zeros_like(ws[0])
    sigma = torch.cat(Ss).mean()
    return sigma * (polar_factor(torch.cat(Us, 1)) @ polar_factor(torch.cat(Vs, 1)).mT)


@register
@dataclass(frozen=True)
class IsoCTS:
    """Common subspace plus task-specific directions, orthogonalized, isotropic spectrum, scaled by ``alpha``."""

    name: ClassVar[str] = "iso-cts"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2502.04959"
    summary: ClassVar[str] = "isotropic merge in a common + task-specific subspace (polar-orthogonalized)"
    min_models: ClassVar[int] = 2
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = False

    alpha: float = 1.0
    common_fraction: float = 0.8
    svd_dtype: str = "float32"

    def __post_init__(self):
        check_alpha(self)
        check_fraction(self, "common_fraction")
        check_svd_dtype(self)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        return per_tensor(deltas, weights, lambda: self.alpha * iso_cts_merge(deltas, weights, self.common_fraction), self.alpha)
