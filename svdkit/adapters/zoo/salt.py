"""SALT (Elsayed et al. 2025, https://arxiv.org/abs/2503.16055): scale-and-shift the top singular values,
LoRA on the rest of the singular-value core, and a ReLU on the whole core.

With the full SVD W = U diag(σ) Vᵀ (k = min(m, n) components) and t = max(1, ⌊ρk⌋):

    Ŝ = blockdiag(diag(α ⊙ σ_{:t} + β),  diag(σ_{t:}) + X Y),   W' = U ReLU(Ŝ) Vᵀ

The layer keeps W untouched, with frozen B = U (m×k), A = Vᵀ (k×n) and the core C = ReLU(Ŝ) − diag(σ),
which is exactly zero at init (α = 1, β = 0, Y = 0, σ ≥ 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Core
from svdkit.adapters.layers import Init
from svdkit.core.linalg import kaiming_uniform, layer_generator, truncated_svd



class SALTCore(Core):
    """C = ReLU(Ŝ) − diag(σ); trains ``scale`` α, ``shift`` β (t each) and the tail LoRA ``X``, ``Y``."""

    def __init__(self, sigma: Tensor, scale: Tensor, shift: Tensor, X: Tensor, Y: Tensor):
        super().__init__()
        self.register_buffer("sigma", sigma.detach().clone())
        for key, value in (("scale", scale), ("shift", shift), ("X", X), ("Y", Y)):
            setattr(self, key, nn.Parameter(value.detach().clone()))

    @property
    def top(self) -> int:
        return self.scale.shape[0]

    def s_hat(self) -> Tensor:
        """Ŝ = blockdiag(diag(α ⊙ σ_top + β), diag(σ_tail) + X Y), k×k."""
        t = self.top
        head = torch.diag(self.scale * self.sigma[:t] + self.shift)
        tail = torch.diag(self.sigma[t:]) + self.X @ self.Y
        return torch.block_diag(head, tail)

    def forward(self) -> Tensor:
        return F.relu(self.s_hat()) - torch.diag(self.sigma)

    def extra_repr(self) -> str:
        return f"k={self.sigma.shape[0]}, t={self.top}, tail LoRA rank {self.X.shape[1]}"


@register
@dataclass(frozen=True)
class SALT(AdapterConfig):
    """SALT (https://arxiv.org/abs/2503.16055): W' = U ReLU(blockdiag(diag(α⊙σ_top+β), diag(σ_tail)+XY)) Vᵀ.

    ``rank`` is the tail LoRA rank r (≤ k − t); ``top_fraction`` ρ sets t = max(1, ⌊ρk⌋). Init α = 1,
    β = 0, X kaiming-uniform (bound 1/√r, seeded per layer), Y = 0. Trains 2t + 2r(k − t) per matrix.
    ``reg_multiplier`` weights the regularizer ‖Ŝ_top − diag σ_top‖_F + ‖XY‖_F (0, unused, as in the
    official code). Defaults: ρ = 0.1 (paper), r = 16 (paper: 256 on SAM), lr 1e-4, weight decay 1e-2.
    The ReLU acts on the whole k×k core, so the update is not low-rank in general: no PEFT export
    (merge instead). The SVD is the exact full one, computed at adapt time (the code's is lazy).
    """

    top_fraction: float = 0.1
    reg_multiplier: float = 0.0

    name = "salt"
    lr = 1e-4
    weight_decay = 1e-2
    basis = "weight SVD, full spectrum"
    trains = "scale/shift of top-t σ, LoRA X·Y on the tail core"
    params = "2t + 2r(k-t)"
    export_rank = "≤ t + r before the ReLU: merged weights only"
    paper = "https://arxiv.org/abs/2503.16055"
    exports_lora = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.top_fraction, (int, float)) and 0 < self.top_fraction <= 1):
            raise ValueError(f"SALT: top_fraction must be in (0, 1], got {self.top_fraction!r}.")
        if not (isinstance(self.reg_multiplier, (int, float)) and self.reg_multiplier >= 0):
            raise ValueError(f"SALT: reg_multiplier must be a number >= 0, got {self.reg_multiplier!r}.")

    def top_count(self, k: int) -> int:
        """t = max(1, ⌊ρk⌋) scaled-and-shifted singular values of a rank-k spectrum."""
        return max(1, math.floor(self.top_fraction * k))

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        k = min(m, n)
        t, r = self.top_count(k), self.rank
        if r > k - t:
            raise ValueError(
                f"SALT: rank {r} (the tail LoRA rank) must be <= k - t = {k} - {t} = {k - t} for a {m}×{n} "
                f"weight (t = max(1, floor(top_fraction·k))); lower the rank or top_fraction."
            )
        U, S, Vh = truncated_svd(weights, k, "top", "exact", dtype=self.dtype)  # all k (cached if enabled)
        X = torch.stack([  # kaiming_uniform(a=√5) on X ((k − t) × r): fan_in = r
            kaiming_uniform((k - t, r), r, layer_generator(self.seed, name), self.dtype) for name in names
        ])  # fmt: skip
        core = {
            "sigma": S,
            "scale": torch.ones(b, t, dtype=S.dtype, device=S.device),
            "shift": torch.zeros(b, t, dtype=S.dtype, device=S.device),
            "X": X.to(S.device),
            "Y": torch.zeros(b, r, k - t, dtype=S.dtype, device=S.device),
        }
        return Init(A=Vh, B=U, trainable=frozenset(), subtract=False, core=core)

    core_type = SALTCore

    def regularizer(self, layer):
        """reg_multiplier · (‖diag(α⊙σ_top + β) − diag(σ_top)‖_F + ‖X Y‖_F), or None when the weight is 0."""
        if self.reg_multiplier == 0:
            return None
        core = layer.core
        t = core.top
        top_change = core.scale * core.sigma[:t] + core.shift - core.sigma[:t]  # the diagonal of Ŝ_top − diag σ_top
        return self.reg_multiplier * (torch.linalg.vector_norm(top_change) + torch.linalg.matrix_norm(core.X @ core.Y))
