"""QR-LoRA (Liang & Bharadwaj 2025, https://arxiv.org/abs/2508.21810; not the ICCV'25 ΔR method of
the same name): train one scalar per direction of a column-pivoted QR basis of W.

    W P = Q R,   ΔW = Σ_{i≤r} λ_i q_i r̃_iᵀ,   r̃_i = row i of R Pᵀ (un-permuted),   λ = 0 at init

r is chosen per layer: the smallest r whose cumulative diagonal energy Σ_{i≤r} e_i / Σ_i e_i reaches τ,
with e_i = |R_ii| (or R_ii² with ``energy="squared"``). Frozen B = Q_r, A = (R Pᵀ)_{:r}, core diag(λ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init
from svdkit.core.linalg_qr import pivoted_qr
from svdkit.core.linalg_rank import energy_rank

ENERGIES = ("abs", "squared")


@register
@dataclass(frozen=True)
class QRLoRA(AdapterConfig):
    """QR-LoRA (https://arxiv.org/abs/2508.21810): ΔW = Q_r diag(λ) (R Pᵀ)_{:r} from W P = Q R, λ = 0 at init.

    Trains r scalars per matrix, r per layer from the energy threshold ``tau`` (default 0.9; the paper
    uses 0.9–0.95) on e_i = |R_ii| (``energy="abs"``, as METHODS.md reads the paper) or R_ii²
    (``energy="squared"``): the method section's formula could not be checked, so both are offered.
    ``rank`` is unused; ``max_rank`` (None: no cap) caps r. Layers get different ranks (not batched).
    Exports as an exact rank-r LoRA (B = Q_r diag(λ), A = (R Pᵀ)_{:r}). The pivoted QR is svdkit's own
    Householder/Businger–Golub routine (``svdkit.core.linalg_qr.pivoted_qr``). Layer selection and learning rate
    are not given by the paper [?]: here all-linear targets and the library default lr 2e-4.
    """

    tau: float = 0.9
    energy: str = "abs"
    max_rank: int | None = None

    name = "qr-lora"
    basis = "column-pivoted QR of W"
    trains = "one scalar per QR direction"
    params = "r_layer (energy threshold τ)"
    export_rank = "r_layer"
    paper = "https://arxiv.org/abs/2508.21810"
    batched = False
    uses_rank = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.tau, (int, float)) and 0 < self.tau <= 1):
            raise ValueError(f"QRLoRA: tau must be in (0, 1], got {self.tau!r}.")
        if self.energy not in ENERGIES:
            raise ValueError(f"QRLoRA: energy must be one of {ENERGIES}, got {self.energy!r}.")
        if self.max_rank is not None and (not isinstance(self.max_rank, int) or self.max_rank <= 0):
            raise ValueError(f"QRLoRA: max_rank must be a positive integer or None, got {self.max_rank!r}.")

    def initialize(self, weights, names, calibration=None) -> Init:
        if weights.shape[0] != 1:
            raise ValueError(
                f"QRLoRA initializes one layer at a time (its layers get their own ranks), got {weights.shape[0]}."
            )
        Q, R, perm = pivoted_qr(weights[0], self.dtype)
        r = energy_rank(R.diagonal(), self.tau, power=1 if self.energy == "abs" else 2)  # e_i = |R_ii| or R_ii²
        r = r if self.max_rank is None else min(r, self.max_rank)
        A = torch.empty_like(R[:r]).index_copy_(1, perm, R[:r])  # (R Pᵀ)_{:r}: column perm[c] is R's column c
        lam = torch.zeros(1, r, dtype=R.dtype, device=R.device)
        B = Q[:, :r].contiguous()
        return Init(A=A[None], B=B[None], trainable=frozenset(), subtract=False, core={"value": lam})

    core_type = Delta
