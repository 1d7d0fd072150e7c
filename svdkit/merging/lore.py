"""LoRE-Merging, low-rank estimation without the base model (Liu et al., 2025, https://arxiv.org/abs/2502.10749).

The base θ₀ is unknown (``base=None``). Per matrix, with the fine-tuned weights θ_t, minimise
Σ_t ‖θ₀ + δ_t − θ_t‖_F² + μ‖δ_t‖_* by coordinate descent:

    θ₀ ← (1/T) Σ_t (θ_t − δ_t),   δ_t ← SVT_μ(θ_t − θ₀)   (singular-value soft-thresholding),

starting from δ_t = 0, for ``iterations`` rounds; then θ = θ₀ + α · TIES(δ_1 … δ_T) (sign election and
disjoint mean, no trimming: the low-rank δ_t are already the denoised task vectors; the paper combines them
with a standard merge rule). μ is set per matrix, once, as ``threshold`` × the largest σ₁(θ_t − mean θ)
so it is scale-free (our choice; the paper tunes μ). Non-matrix tensors take the plain mean of the models.
Per-task weights scale δ_t in the combination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg_merge import disjoint_mean, singular_value_threshold
from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_alpha, check_fraction, check_svd_dtype, is_matrix


def lore_estimate(thetas: list[Tensor], threshold: float, iterations: int) -> tuple[Tensor, list[Tensor]]:
    """(θ₀, [δ_t]) by alternating the mean and singular-value thresholding."""
    base = sum(thetas) / len(thetas)
    mu = threshold * max(float(torch.linalg.matrix_norm(t - base, ord=2)) for t in thetas)
    deltas = [torch.zeros_like(base) for _ in thetas]
    for _ in range(iterations):
        deltas = [singular_value_threshold(t - base, mu) for t in thetas]
        base = sum(t - d for t, d in zip(thetas, deltas)) / len(thetas)
    return base, deltas


@register
@dataclass(frozen=True)
class Lore:
    """Base-free: estimate a shared base and low-rank task vectors, merge those with TIES' sign rule."""

    name: ClassVar[str] = "lore"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2502.10749"
    summary: ClassVar[str] = "base-free: shared base + SVT low-rank task vectors by coordinate descent"
    min_models: ClassVar[int] = 2
    base_free: ClassVar[bool] = True
    lora_native: ClassVar[bool] = False

    alpha: float = 1.0
    threshold: float = 0.1
    iterations: int = 10
    svd_dtype: str = "float32"

    def __post_init__(self):
        check_alpha(self)
        check_fraction(self, "threshold")
        check_svd_dtype(self)
        if self.iterations < 1:
            raise ValueError(f"lore: iterations must be ≥ 1 (got {self.iterations}).")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def merge(self, thetas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        """The merged *weight* from the T fine-tuned weights (no base)."""
        if not is_matrix(thetas[0]) or all(torch.equal(t, thetas[0]) for t in thetas[1:]):
            return sum(thetas) / len(thetas)  # vectors, and tensors no model changed (frozen embeddings): the mean
        base, deltas = lore_estimate(thetas, self.threshold, self.iterations)
        return base + self.alpha * disjoint_mean(torch.stack(deltas), torch.tensor(weights, dtype=base.dtype))
