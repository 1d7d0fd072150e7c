"""``svd-llm``: truncation-aware data whitening (Wang et al., ICLR 2025, https://arxiv.org/abs/2403.07378)."""

from __future__ import annotations

from dataclasses import dataclass

from svdkit.compression.config import CompressConfig
from svdkit.core.covariance import cholesky_whitening
from svdkit.core.registry import register
from svdkit.core.statistics import InputCovariance


@register
@dataclass(frozen=True)
class SVDLLM(CompressConfig):
    """SVD-LLM: whiten the inputs, then truncate.

        S Sᵀ = XᵀX (Cholesky, float64),  W S = U Σ Vᵀ,  W' = (U_k Σ_k^{1/2})(Σ_k^{1/2} V_kᵀ S⁻¹),
        k = ⌊(1 − ratio)·m·n/(m + n)⌋ for every matrix (the paper's uniform ratio).

    Theorem (the paper's): S⁻¹X has orthonormal rows' Gram, so ‖(W − W')X‖_F² = Σ_{i>k} σ_i² — truncating
    the smallest whitened singular values is loss-optimal, unlike ASVD's diagonal scaling. XᵀX is
    ``InputCovariance`` (summed over non-padding tokens, divided by the number of sequences: the scale does
    not change W'); a covariance that is not positive definite is damped (:func:`cholesky_whitening`) with a
    warning. q/k/v and gate/up share their input, so one covariance serves each group.

    update:      SVD-LLM v1's layer-wise closed-form update (default off, the paper's whitening-only row):
                 the left factor is re-solved by least squares so the compressed layer, fed the compressed
                 model's inputs X_c, matches the original layer's outputs W X_o
                 (:func:`svdkit.core.covariance.least_squares_left`). It needs ``calibration=batches`` (the
                 layer-by-layer path, which also bounds memory by one block's statistics).
    Calibration: the paper uses 256 × 2048 WikiText-2 tokens; the CLI's default is 16 sequences.
    """

    update: bool = False

    name = "svd-llm"
    paper = "https://arxiv.org/abs/2403.07378"
    summary = "truncation-aware whitening (Cholesky of XᵀX) + SVD; optional closed-form update of U"
    uses_calibration = True
    whitening = True

    def statistic(self) -> InputCovariance:
        return InputCovariance()

    def transform(self, name, weight, stats):
        return cholesky_whitening(stats["covariance"].to(weight.device), name)
