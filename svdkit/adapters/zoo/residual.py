"""Residual methods: adapt a slice of the weight's own spectrum, W = W_res + s·B A.

PiSSA (top-r), MiLoRA and SoMA (bottom-r) share the residual-init R(W, idx, s) of METHODS.md §0:
B = U_idx diag(√(σ_idx/s)), A = diag(√(σ_idx/s)) V_idxᵀ, so s·B A = U_idx Σ_idx V_idxᵀ.
The original weight stays untouched unless ``fold=True``; the forward subtracts the frozen s·B₀A₀.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.layers import Init
from svdkit.core.linalg import balanced_factors, layer_seed, truncated_svd


def residual_init(cfg: AdapterConfig, weights, names, which: str) -> Init:
    """R(W, idx, s) for a batch of same-shaped weights, with exact or seeded randomized SVD."""
    seeds = [layer_seed(cfg.seed, name) for name in names]
    U, S, Vh = truncated_svd(weights, cfg.rank, which, cfg.svd, seeds, cfg.niter, cfg.oversample, cfg.dtype)
    B, A = balanced_factors(U, S, Vh, cfg.scaling)
    return Init(A=A, B=B)


@register
@dataclass(frozen=True)
class PiSSA(AdapterConfig):
    """PiSSA (https://arxiv.org/abs/2404.02948): train the principal components.

    W = W_res + s·B A,  B = U_r √(Σ_r/s),  A = √(Σ_r/s) V_rᵀ (top-r),  W_res = W − U_r Σ_r V_rᵀ.
    Paper defaults: r = α = 128, dropout 0, lr 2e-5, weight decay 0; here r = α = 16.
    ``svd="randomized"`` is the fast init (the paper's ``niter`` variant, here with oversampling and seeds).
    """

    name = "pissa"
    lr = 2e-5
    basis = "weight SVD, top-r"
    trains = "B, A"
    params = "r(m+n)"
    export_rank = "2r (r if B or A frozen)"
    paper = "https://arxiv.org/abs/2404.02948"

    def initialize(self, weights, names, calibration=None) -> Init:
        return residual_init(self, weights, names, "top")


@register
@dataclass(frozen=True)
class MiLoRA(AdapterConfig):
    """MiLoRA (https://arxiv.org/abs/2406.09044): train the minor singular components.

    W = W_res + s·B A,  B = U_{−r} √(Σ_{−r}/s),  A = √(Σ_{−r}/s) V_{−r}ᵀ (bottom-r).
    Paper defaults: r = α = 64, dropout 0.05, lr 3e-4; here r = α = 16, dropout 0.05.
    ``svd="randomized"`` uses seeded block inverse iteration (fp64) instead of a full SVD.
    """

    dropout: float = 0.05

    name = "milora"
    lr = 3e-4
    basis = "weight SVD, bottom-r"
    trains = "B, A"
    params = "r(m+n)"
    export_rank = "2r (r if B or A frozen)"
    paper = "https://arxiv.org/abs/2406.09044"

    def initialize(self, weights, names, calibration=None) -> Init:
        return residual_init(self, weights, names, "bottom")


@register
@dataclass(frozen=True)
class SoMA(AdapterConfig):
    """SoMA (https://arxiv.org/abs/2412.04077): MiLoRA's minor-component residual init with SoMA's defaults.

    W = W_res + s·B A,  B = U_{−r} √(Σ_{−r}/s),  A = √(Σ_{−r}/s) V_{−r}ᵀ (bottom-r), as MiLoRA.
    Defaults (official DINOv2 + Mask2Former config): r = α = 16, i.e. s = 1, kept at any rank (α = None
    means α = r; pass alpha=16 for the config's fixed α at another rank), dropout 0, AdamW lr 1e-4, and SoMA's
    annealed weight decay: cosine from the run's weight decay (0.05 by default) at step 0 to
    ``final_weight_decay`` = 1e-5 at the last step,
        λ(t) = λ_T + (λ₀ − λ_T)·½(1 + cos(π t/T)),
    applied by svdkit's training loop and the Trainer callback. Not applied: its backbone lr multiplier 0.5
    and freezing the blocks before ``start_lora_idx`` (use ``targets``/``exclude`` for that).
    """

    final_weight_decay: float = 1e-5

    name = "soma"
    lr = 1e-4
    weight_decay = 0.05
    basis = "weight SVD, bottom-r"
    trains = "B, A"
    params = "r(m+n)"
    export_rank = "2r (r if B or A frozen)"
    paper = "https://arxiv.org/abs/2412.04077"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.final_weight_decay >= 0:
            raise ValueError(f"SoMA: final_weight_decay must be >= 0, got {self.final_weight_decay!r}.")

    def initialize(self, weights, names, calibration=None) -> Init:
        return residual_init(self, weights, names, "bottom")

    def weight_decay_at(self, base: float, step: int, total_steps: int) -> float:
        progress = min(1.0, step / max(1, total_steps))
        return self.final_weight_decay + (base - self.final_weight_decay) * 0.5 * (1 + math.cos(math.pi * progress))
