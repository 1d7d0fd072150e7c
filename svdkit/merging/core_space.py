"""Core Space merging of LoRAs (Panariello, Marczak et al., NeurIPS 2025, https://arxiv.org/abs/2509.17786).

Per LoRA-adapted matrix with Δ_t = B_t A_t (B_t: m × r_t, A_t: r_t × n; ranks may differ):
stack B = [B_1 … B_T] (m × Σr) and A = [A_1; …; A_T] (Σr × n); U_ref = left singular vectors of B,
V_ref = right singular vectors of A (as rows, ρ_A × n), both without their zero-σ directions. Every update
lies in span(U_ref) ⊗ span(V_ref), so the small core M_t = (U_refᵀ B_t)(A_t V_refᵀ) (ρ_B × ρ_A) represents
it losslessly: U_ref M_t V_ref = Δ_t. The cores merge with an ordinary rule (``inner``: task arithmetic by
default, TIES, TSV-M, Iso-C), then Δ = α U_ref M V_ref: a rank-ρ_A LoRA (B = α U_ref M, A = V_ref), exact.
Only the m × Σr and Σr × n stacks are decomposed, never an m × n matrix. With ``inner="task-arithmetic"``
the merge equals the sum of the LoRAs exactly.

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


def _nonzero(U: Tensor, S: Tensor, Vh: Tensor, tol: float) -> int:
    return int((S > tol * S[0]).sum()) if S.numel() and S[0] > 0 else 0


def core_space(factors: list[tuple[Tensor, Tensor]], tol: float = 1e-7) -> tuple[Tensor, list[Tensor], Tensor]:
    """(U_ref, [M_t], V_ref) with U_ref M_t V_ref = B_t A_t."""
    U, S, Vh = thin_svd(torch.cat([B for B, _ in factors], 1))
    U_ref = U[:, :_nonzero(U, S, Vh, tol)]
    U2, S2, Vh2 = thin_svd(torch.cat([A for _, A in factors], 0))
    V_ref = Vh2[:_nonzero(U2, S2, Vh2, tol)]
    return U_ref, [(U_ref.mT @ B) @ (A @ V_ref.mT) for B, A in factors], V_ref


@register
@dataclass(frozen=True)
class CoreSpace:
    """Merge LoRAs through their r×r cores in the stacked factors' bases (lossless; any ranks)."""

    name: ClassVar[str] = "core-space"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2509.17786"
    summary: ClassVar[str] = "LoRA merge of small cores in the stacked factors' bases (lossless, mixed ranks)"
    min_models: ClassVar[int] = 2
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = True

    alpha: float = 1.0
    inner: str = "task-arithmetic"
    density: float = 1.0  # TIES trim of the cores (inner="ties")
    svd_dtype: str = "float64"  # the official code's

    def __post_init__(self):
        check_lora_native(self, RULES)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def merge_factors(self, factors: list[tuple[Tensor, Tensor]], key: str = "") -> tuple[Tensor, Tensor]:
        if (empty := no_update(factors)) is not None:
            return empty
        U_ref, cores, V_ref = core_space(factors)
        if U_ref.shape[1] == 0 or V_ref.shape[0] == 0:
            return U_ref[:, :0], V_ref[:0]
        return self.alpha * (U_ref @ inner_merge(cores, self.inner, self.density)), V_ref

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        return merge_dense_via_factors(self, deltas, weights, key)
