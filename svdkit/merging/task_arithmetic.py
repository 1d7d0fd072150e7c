"""Task arithmetic (Ilharco et al., ICLR 2023, https://arxiv.org/abs/2212.04089).

θ = θ₀ + λ Σ_t w_t τ_t with τ_t = θ_t − θ₀, on every tensor (matrices and vectors alike), exactly
mergekit's ``task_arithmetic`` (normalize off). λ = 1 is the data-free default (mergekit's); the paper
chooses λ on validation data (typically 0.3–0.5 for 8 tasks), which ``benchmarks/merge.py`` also reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_alpha, weighted


def task_sum(deltas: list[Tensor], weights: list[float]) -> Tensor:
    """Σ_t w_t Δ_t."""
    return sum(weighted(deltas, weights))


@register
@dataclass(frozen=True)
class TaskArithmetic:
    """θ₀ + α Σ_t w_t τ_t; ``alpha`` is the paper's λ."""

    name: ClassVar[str] = "task-arithmetic"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2212.04089"
    summary: ClassVar[str] = "θ₀ + λ Σ w_t τ_t (sum of task vectors)"
    min_models: ClassVar[int] = 1
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = False

    alpha: float = 1.0

    def __post_init__(self):
        check_alpha(self)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        return self.alpha * task_sum(deltas, weights)
