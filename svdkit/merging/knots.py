"""KnOTS, merging LoRAs in an aligned basis (Stoica et al., ICLR 2025, https://arxiv.org/abs/2410.19735).

Per LoRA-adapted matrix with task updates Δ_t = B_t A_t (m × n): concatenate them column-wise,
X = [Δ_1 | … | Δ_T] = U Σ [V_1ᵀ | … | V_Tᵀ], drop the directions with σ ≤ tol·σ₁ (the official code drops
σ ≤ 1e-5 in fp64; ours is relative to σ₁), and merge the aligned per-task representations R_t = Σ V_tᵀ
(ρ × n) with an ordinary rule (``inner``: TIES by default, as the paper; TA, TSV-M, Iso-C); then
Δ = α U R_merged. The SVD of X never forms X: with B_stack = [B_1 … B_T] = Q R (QR), X = Q (R · blockdiag(A_t)),
so only a Σr × Tn matrix is decomposed. The result is a rank-ρ LoRA (B = αU, A = R_merged), exact.

Deviation: TIES trimming is per tensor here (the official code flattens all layers into one vector).
Dense (fully fine-tuned) inputs enter through their exact SVD factors. Non-matrix tensors: weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg_merge import thin_svd
from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_lora_native, merge_dense_via_factors, no_update
from svdkit.merging.inner import RULES, inner_merge


def knots_align(factors: list[tuple[Tensor, Tensor]], tol: float = 1e-6) -> tuple[Tensor, list[Tensor]]:
    """(U, [R_t]) with [B_1A_1 | … | B_TA_T] = U [R_1 | … | R_T], U orthonormal (m × ρ)."""
    Q, Rb = torch.linalg.qr(torch.cat([B for B, _ in factors], 1))
    blocks, start = [], 0
    for B, A in factors:
        r = B.shape[1]
        blocks.append(Rb[:, start:start + r] @ A)
        start += r
    Uk, S, Vh = thin_svd(torch.cat(blocks, 1))
    keep = int((S > tol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    U, SVh = Q @ Uk[:, :keep], S[:keep, None] * Vh[:keep]
    n = factors[0][1].shape[1]
    return U, [SVh[:, t * n:(t + 1) * n] for t in range(len(factors))]


@register
@dataclass(frozen=True)
class Knots:
    """SVD of the concatenated LoRA updates, merge the aligned per-task blocks with ``inner``."""

    name: ClassVar[str] = "knots"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.19735"
    summary: ClassVar[str] = "LoRA merge in the basis of the concatenated updates' SVD (inner: TIES/TA/TSV/Iso)"
    min_models: ClassVar[int] = 2
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = True

    alpha: float = 1.0
    inner: str = "ties"
    density: float = 1.0  # TIES trim inside the aligned basis (1: sign election and disjoint mean only)
    svd_dtype: str = "float64"  # the official code's

    def __post_init__(self):
        check_lora_native(self, RULES)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def merge_factors(self, factors: list[tuple[Tensor, Tensor]], key: str = "") -> tuple[Tensor, Tensor]:
        if (empty := no_update(factors)) is not None:
            return empty
        U, R = knots_align(factors)
        if U.shape[1] == 0:
            return U, factors[0][1][:0]
        return self.alpha * U, inner_merge(R, self.inner, self.density)

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        return merge_dense_via_factors(self, deltas, weights, key)
