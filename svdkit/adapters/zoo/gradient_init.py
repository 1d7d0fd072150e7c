"""Gradient-initialized LoRA: the adapters start from the SVD of the one-step full gradient.

Both methods read G = (1/K) Σ_k ∂L_k/∂W (m × n, nn.Linear layout), the mean full gradient of every target
weight over the calibration batches (``svdkit.calibrate`` with ``MeanGradient``), and differ in what they
do with it:

- LoRA-One: B₀A₀ ∝ the best rank-r approximation of −G, added to W (a deliberate one-step GD; the base
  weight is untouched, the initial model is W + s·B₀A₀ — not function-preserving).
- LoRA-GA: A and B span disjoint halves of G's top-2r singular subspace, so the first LoRA step follows the
  full-gradient step; W_res = W − s·B A keeps the init function-preserving (rank-2r export).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.layers import Init
from svdkit.core.checks import check_number
from svdkit.core.linalg import layer_seed, truncated_svd

_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")


def gradient_svd(cfg: AdapterConfig, weights: Tensor, names: Sequence[str], calibration, rank: int, sign: float = 1.0):
    """Top-``rank`` SVD of sign·G for each of the b same-shaped weights: (U (b,m,k), S (b,k), Vh (b,k,n)).

    G is ``calibration[name]["gradient"]``; the SVD honours ``cfg.svd``/``niter``/``oversample`` (seeded per
    layer) and computes in ``cfg.dtype``.
    """
    cls = type(cfg).__name__
    if calibration is None:
        raise ValueError(f"{cls} initializes from the full gradient: compute it with stats = svdkit.calibrate(model, "
                         f"batches, cfg) and pass svdkit.adapt(model, cfg, calibration=stats).")  # fmt: skip
    m, n = weights.shape[-2:]
    if rank > min(m, n):
        raise ValueError(f"{cls}: {names[0]} (weight {m}×{n}) is too small for the {rank} gradient singular vectors "
                         f"rank {cfg.rank} needs (at most {min(m, n)}); lower the rank or exclude the module.")  # fmt: skip
    grads = []
    for name in names:
        G = calibration[name]["gradient"]
        if tuple(G.shape) != (m, n):
            raise ValueError(f"{cls}: the calibration gradient of {name} is {tuple(G.shape)} but its weight is {m}×{n} "
                             "(out × in); the statistics belong to another model: recompute them with svdkit.calibrate.")  # fmt: skip
        if not bool(torch.isfinite(G).all()):
            raise ValueError(f"{cls}: the calibration gradient of {name} has NaN/Inf entries; check the calibration "
                             "loss (labels, dtype) and recompute it.")  # fmt: skip
        grads.append(G)
    G = torch.stack(grads).to(device=weights.device, dtype=cfg.dtype) * sign
    seeds = [layer_seed(cfg.seed, name) for name in names]
    return truncated_svd(G, rank, "top", cfg.svd, seeds, cfg.niter, cfg.oversample, cfg.dtype)


def gradient_of(calibration, name: str) -> Tensor | None:
    """The module's calibration gradient, or None when the loss never reached it (or it is exactly zero)."""
    try:
        G = calibration[name]["gradient"]
    except KeyError:  # adapt has checked that the statistics cover every target: no gradient was recorded
        return None
    return G if bool(G.ne(0).any()) else None


def drop_gradientless(cfg: AdapterConfig, calibration, shapes: dict) -> AdapterConfig:
    """``cfg`` with the targets that got no gradient added to ``exclude`` (with a warning): the gradient
    gives them no direction to start from (LoRA-One would divide by σ₁ = 0), and training would not move
    them either. The saved config lists them, so load_adapter selects the same modules."""
    dead = [name for name in shapes if gradient_of(calibration, name) is None]
    if not dead:
        return cfg
    if len(dead) == len(shapes):
        raise ValueError(f"{type(cfg).__name__}: the calibration loss gives no gradient to any target module "
                         f"(e.g. {dead[0]}); check the calibration batches' labels or loss and the targets.")  # fmt: skip
    warnings.warn(f"{type(cfg).__name__}: {len(dead)} target module(s) get no gradient from the calibration loss "
                  f"and are left unadapted: {', '.join(dead[:4])}{' …' if len(dead) > 4 else ''}.", stacklevel=3)  # fmt: skip
    pattern = "|".join(f"^{re.escape(name)}$" for name in dead)
    return dataclasses.replace(cfg, exclude=pattern if cfg.exclude is None else f"(?:{cfg.exclude})|{pattern}")


def _check_positive(cfg: AdapterConfig, **values: float) -> None:
    for field, value in values.items():
        check_number(cfg, field, value, low=0, low_open=True, finite=True)


def mean_gradient():
    """The statistic both methods measure: the mean full gradient ∂L/∂W of every target (fp32)."""
    from svdkit.core.statistics import MeanGradient

    return MeanGradient()


@register
@dataclass(frozen=True)
class LoRAOne(AdapterConfig):
    """LoRA-One (https://arxiv.org/abs/2502.01235): start LoRA at the best rank-r one-step GD of the full gradient.

    −G ≈ U_r S_r V_rᵀ;  B₀ = U_r S_r^{1/2}/√(σ₁γ),  A₀ = S_r^{1/2} V_rᵀ/√(σ₁γ);  W' = W + s·B A with B, A
    starting at B₀, A₀ — so the initial model is W − (α/(√r γ σ₁))·[G]_r: NOT function-preserving (by design),
    the base weight is untouched and the export is a plain rank-r LoRA. s = α/√r (rsLoRA, ``use_rslora=True``).
    Defaults (official math setup): r = 8, α = 16, γ = 128, lr 2e-4, all linear layers, 8 calibration samples.
    Paper vs code: the README writes Diag(S) without the square root; the official code splits S^{1/2}
    between B and A and divides both by √(σ₁γ) — implemented here (METHODS.md §12). The code's
    ``svd_lowrank(−G, q=512, niter=16)`` is ``svd="randomized"`` here; the default is the exact SVD.
    ``precondition=True`` turns on the optional Riemannian preconditioner (after clipping, before the optimizer
    step): ∇_A ← (BᵀB + λI)⁻¹∇_A, ∇_B ← ∇_B(AAᵀ + λI)⁻¹ with λ = ``prec_reg`` = 1e-6 (the official repo marks
    its preconditioned optimizer "under revision"; off by default).
    """

    rank: int = 8
    alpha: float | None = 16
    use_rslora: bool = True
    gamma: float = 128.0
    precondition: bool = False
    prec_reg: float = 1e-6

    name = "lora-one"
    uses_calibration = True
    lr = 2e-4
    calibration_samples = 8
    basis = "one-step full gradient SVD (−G), top-r"
    trains = "B, A"
    params = "r(m+n)"
    export_rank = "r"
    paper = "https://arxiv.org/abs/2502.01235"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, gamma=self.gamma, prec_reg=self.prec_reg)
        if not isinstance(self.precondition, bool):
            raise ValueError(f"LoRAOne: precondition must be True or False, got {self.precondition!r}.")

    def statistic(self):
        return mean_gradient()

    def resolve(self, calibration, shapes) -> AdapterConfig:
        return drop_gradientless(self, calibration, shapes)

    def initialize(self, weights, names, calibration=None) -> Init:
        U, S, Vh = gradient_svd(self, weights, names, calibration, self.rank, sign=-1.0)
        top = S[..., :1]  # σ₁ of each layer, (b, 1)
        if bool((top <= 0).any()):
            zero = [name for name, s in zip(names, top[:, 0].tolist()) if s <= 0]
            raise ValueError(f"LoRAOne: the calibration gradient of {zero[0]} is zero, so there is no direction to "
                             "start from; exclude the module (it gets no gradient from the loss) or calibrate on data "
                             "that reaches it.")  # fmt: skip
        root = (S / (top * self.gamma)).sqrt()  # S_r^{1/2}/√(σ₁γ)
        return Init(A=root.unsqueeze(-1) * Vh, B=U * root.unsqueeze(-2), subtract=False)

    def after_clipping(self, layers: dict, peak_lr: float) -> None:
        """With ``precondition``: ∇_A ← (BᵀB + λI)⁻¹∇_A and ∇_B ← ∇_B(AAᵀ + λI)⁻¹ (both from the current A, B)."""
        if not self.precondition:
            return
        with torch.no_grad():
            for layer in layers.values():
                precondition_lora(layer.lora_A, layer.lora_B, self.prec_reg)


def precondition_lora(A: torch.nn.Parameter, B: torch.nn.Parameter, reg: float) -> None:
    """Scaled-GD preconditioning of one LoRA pair's gradients in place (solves in at least fp32)."""
    dtype = torch.promote_types(A.dtype, torch.float32)
    a, b = A.detach().to(dtype), B.detach().to(dtype)
    eye = reg * torch.eye(a.shape[0], dtype=dtype, device=a.device)
    if A.grad is not None:
        A.grad.copy_(torch.linalg.solve(b.T @ b + eye, A.grad.to(dtype)))
    if B.grad is not None:  # ∇_B M⁻¹ = (M⁻¹ ∇_Bᵀ)ᵀ for the symmetric M = AAᵀ + λI
        B.grad.copy_(torch.linalg.solve(a @ a.T + eye, B.grad.to(dtype).T).T)


@register
@dataclass(frozen=True)
class LoRAGA(AdapterConfig):
    """LoRA-GA (https://arxiv.org/abs/2407.05000): LoRA whose first step approximates the full-gradient step.

    G = U S Vᵀ;  A = c·V_{[1:r]}ᵀ,  B = c·U_{[r+1:2r]},  c = m^{1/4}/√γ (stable scale, m = out features);
    W_res = W − s·B A, so the init is function-preserving and the first step moves BA along the top-2r
    subspace of G (rank-2r PEFT export). s = α/√r (rsLoRA, ``use_rslora=True``, the paper's rank stability).
    Defaults (paper Alg. 1 / official LoraGAConfig): direction "ArB2r" (A from the first r, B from the next r
    singular vectors), γ = 16, r = 8, α = 16; lr 2e-5 (the paper's Llama-2 setting, full-FT-like, per the
    authors); 128 calibration samples (official bsz 2 × 64 iterations).
    ``direction``: also "A2rBr" (A from V_{[r+1:2r]}, B from U_{[1:r]}) and "ArBr" (B from the even, A from the
    odd indices of [1:2r]), the official code's alternatives; the paper's theorem allows any disjoint split.
    Paper/official code vs PEFT 0.21: PEFT multiplies B by the singular values S_B and scales only B by c
    (A = V_Aᵀ unscaled); the paper and the authors' code use the orthonormal U, V scaled by c on both sides —
    implemented here (BBᵀG + GAᵀA = c²·[G]_{2r} needs orthonormal columns). Same subspaces as PEFT's, and both
    inits are function-preserving; tests/test_zoo_gradient_init.py pins the exact relation.
    """

    rank: int = 8
    alpha: float | None = 16
    use_rslora: bool = True
    gamma: float = 16.0
    direction: str = "ArB2r"

    name = "lora-ga"
    uses_calibration = True
    lr = 2e-5
    calibration_samples = 128
    basis = "full gradient SVD, top-2r split between A and B"
    trains = "B, A"
    params = "r(m+n)"
    export_rank = "2r"
    paper = "https://arxiv.org/abs/2407.05000"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, gamma=self.gamma)
        if self.direction not in _DIRECTIONS:
            raise ValueError(f"LoRAGA: direction must be one of {_DIRECTIONS}, got {self.direction!r}.")

    def split(self) -> tuple[list[int], list[int]]:
        """(indices of the singular vectors A takes, those B takes) among the top 2r (0-based)."""
        r = self.rank
        if self.direction == "ArB2r":
            return list(range(r)), list(range(r, 2 * r))
        if self.direction == "A2rBr":
            return list(range(r, 2 * r)), list(range(r))
        return list(range(1, 2 * r, 2)), list(range(0, 2 * r, 2))

    def statistic(self):
        return mean_gradient()

    def resolve(self, calibration, shapes) -> AdapterConfig:
        return drop_gradientless(self, calibration, shapes)

    def initialize(self, weights, names, calibration=None) -> Init:
        U, _, Vh = gradient_svd(self, weights, names, calibration, 2 * self.rank)
        a, b = self.split()
        c = weights.shape[-2] ** 0.25 / math.sqrt(self.gamma)
        return Init(A=c * Vh[..., a, :], B=c * U[..., :, b], subtract=True)
