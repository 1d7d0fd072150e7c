"""KaSA: discard the weight's smallest singular components, learn W_trunc + s·B diag(d) A.

Wang, Jiang, Park, Kim, Tang, https://arxiv.org/abs/2412.06071 (ICLR 2025). The truncation changes the
function at init *by design*: the discarded tail U_tail Σ_tail V_tailᵀ is the layer's explicit frozen
s·B₀A₀ (the original weight itself is never written), so the update relative to the original W,
s·(B diag(d) A − B₀A₀), is an exact rank-2r LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init
from svdkit.core.checks import check_number
from svdkit.core.linalg import balanced_factors, kaiming_uniform, layer_generator, layer_seed, truncated_svd
from svdkit.core.linalg_rank import orthogonality


def random_factors(rank: int, n: int, names, seed: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per layer, from one CPU generator seeded by (seed, name): A ~ U(±1/√n) (LoRA's kaiming-uniform), d ~ N(0, 1)."""
    A, d = [], []
    for name in names:
        g = layer_generator(seed, name)
        A.append(kaiming_uniform((rank, n), n, g, dtype))
        d.append(torch.randn(rank, generator=g, dtype=dtype))
    return torch.stack(A), torch.stack(d)


@register
@dataclass(frozen=True)
class KaSA(AdapterConfig):
    """KaSA (https://arxiv.org/abs/2412.06071): W' = W_trunc + s·B diag(d) A, W_trunc = W − U_tail Σ_tail V_tailᵀ.

    The smallest singular components are discarded, so the model changes at init by design. How many
    (``truncate``; METHODS.md §9 marks KaSA [code], so the released code is the spec): ``"code"`` (default)
    keeps in_features − r components as the official code does, i.e. discards r where out ≥ in and
    max(0, r − (in − out)) where out < in (nothing for SmolLM2's GQA k/v and down projections);
    ``"paper"`` keeps min(m, n) − r everywhere, as the paper's text and PEFT. Measured on the default
    model (held-out loss at init on the bench validation split, 32 problems, base 3.493; weights truncated
    directly by an fp64 SVD, which is KaSA's function at init since B = 0; deterministic;
    `benchmarks/init_loss.py` has the same cases through `adapt`): r 8 "code" 4.150, "paper" 8.575;
    r 16 "code" 4.065, "paper" 9.280. The paper's rule removes up to 2.8 % of the v projections' energy and
    wrecks this small model, so the code's rule is also the working default.
    A ~ kaiming-uniform (bound 1/√n, as LoRA), B = 0, d ~ N(0, 1), all trainable (ΔW = 0 w.r.t. W_trunc at
    init; where nothing is discarded the layer is a plain W + s·B diag(d) A). Trains r(m+n+1) per matrix;
    exports as an exact LoRA of rank r + (number discarded) ≤ 2r on the original W.
    Loss term per layer, summed over layers by ``svdkit.regularization``:
    β‖d‖² + γ(‖BᵀB − I_r‖_F + ‖AAᵀ − I_r‖_F), β = 1e-4, γ = 1e-3.
    Paper vs code: the official GLUE script uses the n×n / m×m grams AᵀA, BBᵀ and divides the sum by the
    number of layers; here the r×r grams of the paper's ‖ΔUᵀΔU − I_r‖ (as PEFT) and a plain sum (the
    paper's loss has no 1/L; PEFT sums too).
    Scaling: s = α/r with α = None meaning α = 2r, i.e. the paper's s = 2 at any rank (its GLUE r 8 α 16 and
    LLaMA-3 r 32 α 64); an explicit α gives s = α/r (α/√r with rsLoRA). Defaults: r 16 (s = 2), dropout 0,
    lr 3e-4, weight decay 0.
    """

    beta: float = 1e-4
    gamma: float = 1e-3
    truncate: str = "code"

    name = "kasa"
    lr = 3e-4
    basis = "random (kaiming A, zero B); weight SVD tail discarded (code rule)"
    trains = "B, d, A"
    params = "r(m+n+1)"
    export_rank = "r + discarded ≤ 2r"
    paper = "https://arxiv.org/abs/2412.06071"

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("beta", "gamma"):
            check_number(self, field, getattr(self, field), low=0, finite=True)
        if self.truncate not in ("code", "paper"):
            raise ValueError(f"KaSA: truncate must be 'code' (keep in_features − r components, the released code) "
                             f"or 'paper' (keep min(m, n) − r), not {self.truncate!r}.")

    def discarded(self, m: int, n: int) -> int:
        """How many of the smallest singular components of an m×n (out×in) weight are discarded."""
        k = min(m, n)
        return self.rank if self.truncate == "paper" else max(0, min(self.rank, k - (n - self.rank)))

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        seeds = [layer_seed(self.seed, name) for name in names]
        A0 = B0 = None
        tail = self.discarded(m, n)
        if tail:
            U, S, Vh = truncated_svd(weights, tail, "bottom", self.svd, seeds, self.niter, self.oversample, self.dtype)
            B0, A0 = balanced_factors(U, S, Vh, self.scaling)  # s·B₀A₀ = U_tail Σ_tail V_tailᵀ
        A, d = random_factors(self.rank, n, names, self.seed, self.dtype)
        B = torch.zeros(b, m, self.rank, dtype=self.dtype)
        device = weights.device
        return Init(A=A.to(device), B=B.to(device), subtract=False, core={"value": d.to(device)}, A0=A0, B0=B0)

    core_type = Delta

    @property
    def scaling(self) -> float:
        """s = α/r (α/√r with rsLoRA), α = None meaning 2r: the paper's s = 2."""
        alpha = 2 * self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def regularizer(self, layer) -> Tensor:
        d = layer.core.value
        return self.beta * d.pow(2).sum() + self.gamma * orthogonality(layer.lora_B, layer.lora_A)
