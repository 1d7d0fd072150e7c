"""LoRA: the baseline every spectral method is compared with.

Hu et al. 2021, https://arxiv.org/abs/2106.09685 — W' = W + s·B A, A ~ kaiming-uniform (bound 1/√in,
as PEFT), B = 0, s = α/r (rsLoRA: α/√r, https://arxiv.org/abs/2312.03732). Defaults: r 16, α = r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.layers import Init
from svdkit.core.linalg import kaiming_uniform, layer_generator


@register
@dataclass(frozen=True)
class LoRA(AdapterConfig):
    """LoRA (https://arxiv.org/abs/2106.09685): ΔW = s·B A with B = 0 at init; trains r(m+n) per matrix."""

    name = "lora"
    basis = "random (kaiming A, zero B)"
    trains = "B, A"
    params = "r(m+n)"
    export_rank = "r"
    paper = "https://arxiv.org/abs/2106.09685"

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        A = torch.stack([kaiming_uniform((self.rank, n), n, layer_generator(self.seed, name)) for name in names])
        B = torch.zeros(b, m, self.rank)
        return Init(A=A.to(weights.device), B=B.to(weights.device), subtract=False)
