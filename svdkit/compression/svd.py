"""``svd``: plain truncated SVD of every target weight (the baseline of every SVD-compression paper)."""

from __future__ import annotations

from dataclasses import dataclass

from svdkit.compression.config import CompressConfig
from svdkit.core.registry import register


@register
@dataclass(frozen=True)
class SVDCompress(CompressConfig):
    """Truncated SVD: W = U Σ Vᵀ,  W' = (U_k Σ_k^{1/2})(Σ_k^{1/2} V_kᵀ),  k = ⌊(1 − ratio)·m·n/(m + n)⌋ per matrix.

    Eckart–Young: the best rank-k approximation in Frobenius norm of W alone, blind to the inputs. No data.
    """

    name = "svd"
    paper = "https://doi.org/10.1007/BF02288367"
    summary = "plain truncated SVD, the same ratio for every matrix (data-free baseline)"
