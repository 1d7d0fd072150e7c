"""TIES-Merging (Yadav et al., NeurIPS 2023, https://arxiv.org/abs/2306.01708).

Per task: **trim** τ_t to its top-k magnitudes (k = density·size), **elect** the sign γ = sign(Σ_t w_t τ̂_t)
(+ where 0), **disjoint merge**: τ_m = Σ_{t agrees} w_t τ̂_t / Σ_{t agrees} w_t, then θ = θ₀ + λ τ_m.

``topk_scope="tensor"`` (default) trims each tensor on its own, as mergekit's ``ties`` does (parity-tested);
``"model"`` is the paper's rule (top-k over the whole flattened task vector): a first streamed pass finds
each task's magnitude threshold (it holds every task's |τ| values once, T × model size in fp32), entries at
or above it are kept. density = 0.2 and λ = 1 are the paper's data-free defaults (k = 20 %).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg_merge import disjoint_mean, magnitude_mask
from svdkit.core.registry import config_to_dict, register
from svdkit.merging.common import check_alpha, check_choice, check_fraction


def ties_merge(deltas: list[Tensor], weights: list[float], density: float, thresholds: list[float] | None = None) -> Tensor:
    """Trim (per tensor, or at the given per-task thresholds), elect, disjoint mean; without λ."""
    trimmed = []
    for t, d in enumerate(deltas):
        keep = magnitude_mask(d, density) if thresholds is None else d.abs() >= thresholds[t]
        trimmed.append(d * keep)
    return disjoint_mean(torch.stack(trimmed), torch.tensor(weights, dtype=deltas[0].dtype))


def model_thresholds(stream, density: float) -> list[float]:
    """Each task's k-th largest |τ| over all tensors (k = max(1, ⌊density·N⌋)); ``stream`` yields task lists."""
    values: list[list[Tensor]] = []
    for deltas in stream:
        values = values or [[] for _ in deltas]
        for t, d in enumerate(deltas):
            values[t].append(d.abs().reshape(-1).float())
    out = []
    for per_task in values:
        flat = torch.cat(per_task)
        k = max(1, int(density * flat.numel()))
        out.append(float(torch.topk(flat, k, sorted=False).values.min()) if density < 1 else 0.0)
    return out


@register
@dataclass(frozen=True)
class Ties:
    """Trim to ``density``, elect signs, disjoint mean, scale by ``alpha`` (λ)."""

    name: ClassVar[str] = "ties"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "trim to top-k, elect sign, disjoint mean (per-tensor or whole-model top-k)"
    min_models: ClassVar[int] = 1
    base_free: ClassVar[bool] = False
    lora_native: ClassVar[bool] = False

    alpha: float = 1.0
    density: float = 0.2
    topk_scope: str = "tensor"  # "tensor" (mergekit) | "model" (the paper)

    def __post_init__(self):
        check_alpha(self)
        check_fraction(self, "density")
        check_choice(self, "topk_scope", ("tensor", "model"))

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @property
    def needs_prepass(self) -> bool:
        return self.topk_scope == "model" and self.density < 1

    def prepare(self, stream) -> list[float]:
        return model_thresholds(stream, self.density)

    def merge(self, deltas: list[Tensor], weights: list[float], key: str = "", state=None) -> Tensor:
        return self.alpha * ties_merge(deltas, weights, self.density, state)
