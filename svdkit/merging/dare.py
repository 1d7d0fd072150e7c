"""DARE, drop and rescale (Yu et al., ICML 2024, https://arxiv.org/abs/2311.03099).

Each task delta keeps each entry with probability p = ``density`` (a seeded Bernoulli mask m):
τ̃_t = m ⊙ τ_t / p (the paper's rescale, ``rescale="inverse"``), then the tasks combine with task
arithmetic (θ₀ + λ Σ w_t τ̃_t, mergekit's ``dare_linear``) or with TIES' sign election and disjoint mean
(``combine="ties"``, mergekit's ``dare_ties``). ``rescale="l1"`` matches the masked L1 norm to the
original's (what mergekit does when ``rescale: true``); ``"none"`` skips it.

Masks are drawn per (tensor, task) from a CPU generator seeded with ``layer_seed(seed, f"{key}#{t}")``, so
a merge is reproducible and independent of tensor order. density = 0.1 (drop 90 %) is the DARE README's
setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg import layer_seed
from svdkit.core.linalg_merge import bernoulli_mask, disjoint_mean
from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_alpha, check_choice, check_fraction
from svdkit.merging.task_arithmetic import task_sum


def drop_and_rescale(delta: Tensor, keep: Tensor, density: float, rescale: str) -> Tensor:
    """m ⊙ τ, rescaled by 1/p (``"inverse"``), to the original L1 norm (``"l1"``) or not at all."""
    masked = delta * keep
    if rescale == "inverse":
        return masked / density
    if rescale == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
        return masked * (before / after) if before > 1e-7 and after > 1e-7 else masked
    return masked


def dare_merge(deltas: list[Tensor], weights: list[float], masks: list[Tensor], density: float, rescale: str, combine: str) -> Tensor:
    """The DARE merge for given keep-masks; without λ."""
    dropped = [drop_and_rescale(d, m.to(d.device), density, rescale) for d, m in zip(deltas, masks)]
    if combine == "ties":
        return disjoint_mean(torch.stack(dropped), torch.tensor(weights, dtype=deltas[0].dtype))
    return task_sum(dropped, weights)


@register
@dataclass(frozen=True)
class Dare:
    """Random drop with keep-probability ``density``, rescale, then TA or TIES; scaled by ``alpha``."""

    name: ClassVar[str] = "dare"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2311.03099"
    summary: ClassVar[str] = "seeded Bernoulli drop of delta entries + rescale, then task arithmetic or TIES"
    min_models: ClassVar[int] = 1
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = False

    alpha: float = 1.0
    density: float = 0.1
    combine: str = "task-arithmetic"  # "task-arithmetic" | "ties"
    rescale: str = "inverse"  # "inverse" (1/p, the paper) | "l1" (mergekit) | "none"
    seed: int = 0

    def __post_init__(self):
        check_alpha(self)
        check_fraction(self, "density")
        check_choice(self, "combine", ("task-arithmetic", "ties"))
        check_choice(self, "rescale", ("inverse", "l1", "none"))

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def masks(self, deltas: list[Tensor], key: str) -> list[Tensor]:
        return [bernoulli_mask(d.shape, self.density, torch.Generator().manual_seed(layer_seed(self.seed, f"{key}#{t}")))
                for t, d in enumerate(deltas)]  # fmt: skip

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        masks = self.masks(deltas, key)
        return self.alpha * dare_merge(deltas, weights, masks, self.density, self.rescale, self.combine)
