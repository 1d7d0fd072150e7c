"""SODA (Zhang et al. 2024, https://arxiv.org/abs/2405.21050, WACV 2025): tune the singular values of W and
rotate both of its singular bases with Kronecker-structured orthogonal matrices kept on the Stiefel manifold.

    W = U Σ Vᵀ (thin, k = min(m, n))  →  W' = (U R_U)(Σ + ΔΣ)(V R_V)ᵀ,   R_U = U₁ ⊗ U₂,  R_V = V₁ ⊗ V₂

with U₁, V₁ ∈ O(k₁), U₂, V₂ ∈ O(k₂), k = k₁·k₂. In svdkit's layer (mode ADD, W untouched):

    ΔW = s·U C Vᵀ,   C = R_U diag(σ + Δσ) R_Vᵀ − diag(σ)     (C = 0 at init: R = I, Δσ = 0)

The orthogonal factors train on the manifold (``after_clipping``/``after_step``, :mod:`svdkit.core.linalg_structured`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdkit.adapters.config import AdapterConfig
from svdkit.adapters.cores import Core
from svdkit.adapters.layers import Init
from svdkit.core.linalg import truncated_svd
from svdkit.core.linalg_merge import polar_factor
from svdkit.core.linalg_structured import cayley_retract, closest_divisor, kron_right_t, orthogonal_tangent
from svdkit.core.registry import register

ROTATIONS = ("u1", "u2", "v1", "v2")


class KroneckerRotationCore(Core):
    """C = (U₁ ⊗ U₂) diag(σ + Δσ) (V₁ ⊗ V₂)ᵀ − diag(σ): σ frozen, Δσ (k) and the four orthogonal factors train.

    Built densely (k × k) each forward from the factors in k²(k₁ + k₂) products (never a k³ product), and
    applied to A·x as a dense matrix (k² per token, next to the m·k + k·n of the frozen bases): cores.py has
    no Kronecker structure, which would apply it in 2k(k₁ + k₂) per token."""

    def __init__(self, sigma: Tensor, delta: Tensor, u1: Tensor, u2: Tensor, v1: Tensor, v2: Tensor):
        super().__init__()
        self.register_buffer("sigma", sigma.detach().clone(memory_format=torch.contiguous_format))
        for key, value in (("delta", delta), ("u1", u1), ("u2", u2), ("v1", v1), ("v2", v2)):
            setattr(self, key, nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format)))

    def forward(self) -> Tensor:
        scaled = torch.kron(self.u1, self.u2) * (self.sigma + self.delta)  # R_U diag(σ + Δσ)
        return kron_right_t(scaled, self.v1, self.v2) - torch.diag(self.sigma)

    def extra_repr(self) -> str:
        return f"k={self.sigma.numel()} = {self.u1.shape[0]}·{self.u2.shape[0]}, Kronecker rotations of both bases"


@register
@dataclass(frozen=True)
class SODA(AdapterConfig):
    """SODA-SVD (https://arxiv.org/abs/2405.21050): W' = (U R_U)(Σ + ΔΣ)(V R_V)ᵀ, R = R₁ ⊗ R₂ orthogonal.

    The full thin SVD of each target (k = min(m, n) triplets; ``rank`` is ignored, ``svd`` must be "exact"),
    frozen U (m × k) = B, Vᵀ (k × n) = A; trainable Δσ (k, from 0) and U₁, V₁ (k₁ × k₁), U₂, V₂ (k₂ × k₂) from
    the identity: k + 2(k₁² + k₂²) trainable values per matrix (the manifold has k₁(k₁−1) + k₂(k₂−1) degrees
    of freedom for the rotations; the stored matrices are full). k₁ = ``factor`` or the divisor of k closest
    to √k (576 → 24·24; a prime k gives 1·k). Function-preserving at init exactly (C = 0); the update is
    full-rank, so the export is the merged model (a rank-R LoRA only when asked, with its truncation error).
    s = α (None: 1, the paper's unscaled form).

    Stiefel optimization (the paper uses Stiefel optimizers): each step, ``after_clipping`` stores Rᵢ and
    replaces its gradient G by the tangent projection R·skew(RᵀG) (so weight decay and the Euclidean part
    of G do not move R off the group); the run's optimizer (AdamW) then takes its step R → R + Δ; and
    ``after_step`` retracts that step onto the orthogonal group with the Cayley map,
    R ← R·(I + Ω/2)(I − Ω/2)⁻¹, Ω = skew(Rᵀ Δ). This makes any Euclidean optimizer a Riemannian one (Adam's
    moments are not transported between tangent spaces, an approximation of the paper's momentum Stiefel
    Adam). We chose it over a Cayley *parametrization* (R = cayley(K), K trainable) because the paper
    optimizes R itself on the manifold; it needs svdkit's loop or ``SvdkitTrainer`` (both run the hooks).
    A call to ``svdkit.after_step`` without ``after_clipping`` first (a hand-written loop) falls back to the
    polar projection of R onto the group. Δσ: plain gradient steps (the paper's spectral shift).
    Choices where the paper is open here: both bases rotate (the issue's SODA; the paper's basis rotation
    with the spectral shift on Σ); two Kronecker factors per side; lr 1e-4, weight decay 0.
    """

    factor: int | None = None

    name = "soda"
    lr = 1e-4
    basis = "weight SVD, full spectrum"
    trains = "Δσ; Kronecker rotations U1⊗U2, V1⊗V2 of both bases (Stiefel, Cayley retraction)"
    params = "k + 2(k1² + k2²), k = min(m, n)"
    export_rank = "full (merge)"
    paper = "https://arxiv.org/abs/2405.21050"
    exports_lora = False
    uses_rank = False
    core_type = KroneckerRotationCore

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor is not None and (not isinstance(self.factor, int) or isinstance(self.factor, bool) or self.factor < 1):
            raise ValueError(f"SODA: factor must be None (automatic) or a positive integer k1, got {self.factor!r}.")
        if self.svd != "exact":
            raise ValueError("SODA: svd must be 'exact': SODA rotates the full singular bases (k = min(m, n)).")

    def kron_sizes(self, name: str, k: int) -> tuple[int, int]:
        """(k₁, k₂) with k₁·k₂ = k for a module with k = min(out, in) singular values."""
        k1 = self.factor if self.factor is not None else closest_divisor(k)
        if k % k1:
            raise ValueError(f"SODA: factor={k1} does not divide k = min(out, in) = {k} of {name}; "
                             "set factor=None (automatic) or exclude the module.")  # fmt: skip
        return k1, k // k1

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        k = min(m, n)
        k1, k2 = self.kron_sizes(names[0], k)  # the same for every layer of the batch (same shape)
        U, S, Vh = truncated_svd(weights, k, "top", "exact", dtype=self.dtype)
        eye = lambda d: torch.eye(d, dtype=S.dtype, device=S.device).expand(b, d, d).clone()  # noqa: E731
        core = {"sigma": S, "delta": torch.zeros_like(S), "u1": eye(k1), "u2": eye(k2), "v1": eye(k1), "v2": eye(k2)}
        return Init(A=Vh, B=U, trainable=frozenset(), subtract=False, core=core)

    # -- Stiefel steps -----------------------------------------------------------------------------------
    def after_clipping(self, layers: dict, peak_lr: float) -> None:
        """Store each Rᵢ and project its gradient onto the tangent space at Rᵢ."""
        with torch.no_grad():
            for layer in layers.values():
                for key in ROTATIONS:
                    R = getattr(layer.core, key)
                    layer.method_state.set(f"before_{key}", R.detach().clone())
                    if R.grad is not None:
                        R.grad.copy_(orthogonal_tangent(R, R.grad))

    def after_step(self, layers: dict, step: int, total_steps: int) -> None:
        """Cayley-retract each Rᵢ's step onto the orthogonal group (polar projection without a stored Rᵢ)."""
        with torch.no_grad():
            for layer in layers.values():
                for key in ROTATIONS:
                    R, before = getattr(layer.core, key), layer.method_state.pop(f"before_{key}")
                    R.copy_(polar_factor(R) if before is None else cayley_retract(before, R))
