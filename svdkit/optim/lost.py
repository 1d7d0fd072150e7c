"""LOST (low-rank + channel-wise sparse training, https://arxiv.org/abs/2508.02668): each target linear split by
SVD into a low-rank part on the top-r singular directions and a sparse complement on a few input channels,
both trained from there with AdamW.

    W₀ = U diag(σ) Vᵀ,   B = U_r diag(√σ_r),   A = diag(√σ_r) V_rᵀ,   R = W₀ − B A
    C = the ⌈density·n⌉ input channels (columns) with the largest ‖R_{:,j}‖₂,   S = R[:, C]
    W = B A + S Eᵀ   (E: the m-to-n column scatter of C),   y = x Wᵀ + b

Choices: the split is exact on the kept channels (W = W₀ at init on them; the other channels of R are dropped,
which is LOST's compression); channels are chosen once, at parametrization, by residual column norm and stay
fixed (a buffer saved with the model); ``density`` = 0.1 of the input channels. Trainable per matrix:
r(m + n) + m·⌈density·n⌉.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from svdkit.core import linalg
from svdkit.core.registry import config_to_dict, register
from svdkit.optim.sst import swap, target_linears


class LOSTLinear(nn.Module):
    """y = x (B A + S on channels C)ᵀ + b (see the module docstring)."""

    def __init__(self, linear: nn.Linear, rank: int, density: float):
        super().__init__()
        W = linear.weight.detach()
        r = min(rank, *W.shape)
        U, S, Vh = linalg.svd_exact(W, r)
        root = S.sqrt()
        B, A = U * root, root[:, None] * Vh
        R = W.float() - B @ A
        c = max(1, math.ceil(density * W.shape[1]))
        cols = torch.topk(R.norm(dim=0), c).indices.sort().values
        self.B, self.A = nn.Parameter(B.to(W.dtype)), nn.Parameter(A.to(W.dtype))
        self.S = nn.Parameter(R[:, cols].to(W.dtype).contiguous())
        self.register_buffer("channels", cols)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return (self.B @ self.A).index_add(1, self.channels, self.S)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@register
@dataclass(frozen=True)
class LOST:
    """LOST (https://arxiv.org/abs/2508.02668): see :mod:`svdkit.optim.lost`."""

    kind: ClassVar[str] = "optim"
    name: ClassVar[str] = "lost"
    paper: ClassVar[str] = "https://arxiv.org/abs/2508.02668"
    summary: ClassVar[str] = "train W = B A (top-r SVD) + a channel-wise sparse complement, with AdamW"
    default_lr: ClassVar[float] = 3e-3
    parametrizes: ClassVar[bool] = True

    rank: int = 128
    density: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.density <= 1:
            raise ValueError(f"LOST: density must be in (0, 1], got {self.density}.")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def parametrize(self, model: nn.Module) -> nn.Module:
        for name, linear in target_linears(model):
            swap(model, name, LOSTLinear(linear, self.rank, self.density))
        return model

    def make_for(self, model: nn.Module, lr: float) -> torch.optim.AdamW:
        if not any(isinstance(m, LOSTLinear) for m in model.modules()):
            raise ValueError("LOST: the model has no LOST layers; call svdkit.optim.parametrize(model, cfg) first.")
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=self.weight_decay)
