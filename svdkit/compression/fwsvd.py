"""``fwsvd``: Fisher-weighted SVD (Hsu et al., ICLR 2022, https://arxiv.org/abs/2207.00112)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdkit.compression.config import CompressConfig
from svdkit.core.registry import register
from svdkit.core.statistics import GradientSquares


@register
@dataclass(frozen=True)
class FWSVD(CompressConfig):
    """Fisher-weighted SVD: min ‖Î (W − W')‖ with Î = diag(√I_j) the row importances of the paper's (in × out)
    layout — here the input columns j of W (out × in):

        I_j = Σ_i E[(∂L/∂W_ij)²],  W diag(√I) = U Σ Vᵀ,  W' = (U_k Σ_k^{1/2})(Σ_k^{1/2} V_kᵀ diag(√I)⁻¹).

    Choices: the expectation is estimated from batch gradients of the language-modelling loss over the
    calibration batches (the paper sums per-example gradients of the task loss; ASVD's Fisher option uses
    batch gradients too), so batches need ``labels``. √I_j is floored at ``floor``·max_j √I_j (1e-6) so a
    column that never received gradient is not divided by 0. Same uniform rank as ``svd``.
    """

    floor: float = 1e-6

    name = "fwsvd"
    paper = "https://arxiv.org/abs/2207.00112"
    summary = "Fisher-weighted SVD: input columns weighted by √(summed squared gradients)"
    uses_calibration = True

    def statistic(self) -> GradientSquares:
        return GradientSquares()

    def transform(self, name, weight, stats):
        s = stats["fisher"].double().to(weight.device).sqrt()
        s = s.clamp(min=self.floor * float(s.max().clamp(min=1e-300)))
        return s, 1.0 / s
