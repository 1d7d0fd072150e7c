"""Delta-CoMe, mixed-precision task-vector compression (Ping et al., NeurIPS 2024, https://arxiv.org/abs/2406.08903).

A fine-tune's delta Δ = W_ft − W_0 has a long-tailed spectrum, so Delta-CoMe stores its singular vectors at
mixed precision: more bits for the vectors of larger singular values, few or none for the tail. Here, per
matrix: Δ = U diag(σ) Vᵀ; every triplet i gets a bit width b_i ∈ {0} ∪ ``levels``; u_i and v_i are
fake-quantized (symmetric round-to-nearest, one fp16 scale per vector; σ_i kept in fp16) and
Δ̂ = Σ_i σ_i Q(u_i) Q(v_i)ᵀ. The widths are chosen by greedy marginal allocation under the budget
``bits`` × m × n bits (``bits`` = average bits per delta entry; fp16 is 16): each step upgrades the triplet
whose next level removes the most squared error per extra bit, the error of triplet i at b bits being the
exact σ_i²‖u_i v_iᵀ − Q_b(u_i)Q_b(v_i)ᵀ‖²_F (dropping it costs σ_i²). Larger σ thus get more bits, as in
the paper, with the split derived from the spectrum instead of the paper's fixed 8/3/2-bit bands.
Deviation: round-to-nearest instead of the paper's GPTQ (which needs calibration data).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from svdkit.core.linalg_merge import quantize_vectors, thin_svd, triplet_errors
from svdkit.core.registry import config_to_dict, register

SCALE_BITS = 16  # per stored vector scale and per σ


def allocate_bits(sigma: Tensor, errors: dict[int, Tensor], shape: tuple[int, int], budget: float) -> Tensor:
    """Per-triplet bit widths (0 = dropped) by greedy marginal allocation: ``errors[b][i]`` is triplet i's
    squared error at b bits (unit σ), the cost of b bits (m + n)·b + 3·16."""
    m, n = shape
    levels = [0, *sorted(errors)]
    cost = {b: 0 if b == 0 else (m + n) * b + 3 * SCALE_BITS for b in levels}
    err = {0: sigma**2, **{b: sigma**2 * e for b, e in errors.items()}}
    current = [0] * sigma.numel()
    heap = []

    def push(i, exclude=()):
        """Queue triplet i's best upgrade (most error removed per extra bit, over every higher width)."""
        best = None
        for b in levels[levels.index(current[i]) + 1:]:
            ratio = float(err[current[i]][i] - err[b][i]) / (cost[b] - cost[current[i]])
            if ratio > 0 and b not in exclude and (best is None or ratio > best[0]):
                best = (ratio, b)
        if best is not None:
            heapq.heappush(heap, (-best[0], i, current[i], best[1], tuple(exclude)))

    for i in range(sigma.numel()):
        push(i)
    spent = 0.0
    while heap:
        _, i, was, b, exclude = heapq.heappop(heap)
        if current[i] != was:
            continue  # stale entry
        extra = cost[b] - cost[was]
        if spent + extra > budget:
            push(i, (*exclude, b))  # this width does not fit; a cheaper one may
            continue
        spent += extra
        current[i] = b
        push(i)
    return torch.tensor(current)


@register
@dataclass(frozen=True)
class DeltaCoMe:
    """Mixed-precision singular vectors of the task delta within ``bits`` bits per delta entry."""

    name: ClassVar[str] = "delta-come"
    kind: ClassVar[str] = "merge"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.08903"
    summary: ClassVar[str] = "task-vector compression: mixed-precision singular vectors, more bits for larger σ (compress_delta)"
    delta_compression: ClassVar[bool] = True

    bits: float = 1.0
    levels: tuple[int, ...] = (8, 4, 3, 2)

    def __post_init__(self):
        if not 0 < self.bits <= 16:
            raise ValueError(f"delta-come: bits (average bits per delta entry) must be in (0, 16], got {self.bits}.")
        if not self.levels or any(not 1 <= int(b) <= 16 for b in self.levels):
            raise ValueError(f"delta-come: levels must be bit widths in 1..16, got {self.levels}.")
        object.__setattr__(self, "levels", tuple(int(b) for b in self.levels))

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def compress(self, delta: Tensor, key: str = "") -> tuple[Tensor, dict]:
        """(Δ̂, stats: bits per entry, triplets per bit width)."""
        U, S, Vh = thin_svd(delta.double())
        V = Vh.mT
        quantized = {b: (quantize_vectors(U, torch.full((S.numel(),), b)), quantize_vectors(V, torch.full((S.numel(),), b)))
                     for b in self.levels}  # fmt: skip
        errors = {b: triplet_errors(U, qu, V, qv) for b, (qu, qv) in quantized.items()}
        m, n = delta.shape
        widths = allocate_bits(S, errors, (m, n), self.bits * m * n)
        approx = torch.zeros_like(U[:, :1] @ V[:, :1].mT)
        for b in self.levels:
            cols = widths == b
            if cols.any():
                qu, qv = quantized[b]
                approx += (qu[:, cols] * S[cols]) @ qv[:, cols].mT
        used = sum(((m + n) * b + 3 * SCALE_BITS) * int((widths == b).sum()) for b in self.levels)
        return approx.to(delta.dtype), {"bits_per_entry": used / (m * n),
                                        "triplets": {str(b): int((widths == b).sum()) for b in self.levels}}  # fmt: skip
