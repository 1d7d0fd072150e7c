"""BiLoRA: a pseudo-SVD update P diag(λ) Q whose vectors and values train on two different splits of the
training data (bi-level optimization, METHODS.md §19).

    ΔW = s·P diag(λ) Q,   P = B (m × r), Q = A (r × n), λ (r) a diagonal core,  s = α/r

    lower level:  P*, Q*(λ) = argmin_{P,Q}  L(P, Q, λ; D₁) + γ·R(P, Q),  R = ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F
    upper level:  min_λ  L(P*(λ), Q*(λ), λ; D₂)

The two splits are svdkit's general two-split mechanism (``AdapterConfig.second_split/split_at/split_of``):
svdkit's training loop holds a seeded share of the training items apart as D₂ and alternates batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from svdkit.adapters.config import AdapterConfig
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init
from svdkit.adapters.rank_schedule import triplet_init
from svdkit.core.checks import check_number
from svdkit.core.linalg_rank import orthogonality
from svdkit.core.registry import register

VALUES = "core.value"  # the adapter tensor holding λ (the upper level's variable)


@register
@dataclass(frozen=True)
class BiLoRA(AdapterConfig):
    """BiLoRA (https://arxiv.org/abs/2403.13037): P diag(λ) Q with P, Q trained on split D₁ and λ on split D₂.

    Parametrization as AdaLoRA's (METHODS.md §16): P, Q ~ N(0, 0.02²) seeded per layer, λ = 0, so the update is
    zero at init; r(m + n + 1) trainable values per matrix; export as a rank-r LoRA (lora_B = s·P diag(λ)).
    Hypergradient: the paper's upper level differentiates through the lower level's solution (DARTS-style
    approximation); here the first-order approximation P*(λ) ≈ P, Q*(λ) ≈ Q is used, i.e. plain alternating
    optimization: ``inner_steps`` steps update P, Q on batches of D₁ (λ fixed), then one step updates λ on a
    batch of D₂ (P, Q fixed), and so on. Each step draws the next batch of its own split (each split walks
    through its own epochs); the learning-rate schedule counts every step. The orthogonality regularizer
    γ·R (the lower level's) is the only regularizer; it reaches the optimizer on D₁ steps only (P, Q's
    gradients are dropped on D₂ steps).

    Choices where the paper's abstract is open: D₂ = ``split_fraction`` (default 0.2) of the training items,
    a seeded split of svdkit's training part (the held-out evaluation set stays apart from both); one D₁ step
    per D₂ step (``inner_steps=1``); R and its weight γ = 0.1 at AdaLoRA's normalization (γ·½R per layer,
    averaged over the layers); no regularizer on λ; lr 5e-4 (AdaLoRA's); s = α/r with α = None meaning
    α = r. Needs svdkit's training loop (``svdkit finetune``); the Hugging Face Trainer integration refuses it
    (one data stream).
    """

    rank: int = 12
    split_fraction: float = 0.2
    inner_steps: int = 1
    orth_reg_weight: float = 0.1

    name = "bilora"
    lr = 5e-4
    basis = "random (P, Q ~ N(0, 0.02)), λ = 0"
    trains = "P, Q on split D1; λ on split D2 (alternating)"
    params = "r(m+n+1)"
    export_rank = "r"
    paper = "https://arxiv.org/abs/2403.13037"
    regularizer_mean = True  # svdkit.regularization averages the per-layer terms (as AdaLoRA)
    core_type = Delta

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "split_fraction (the share of training items held apart as D2)", self.split_fraction,
                     low=0, high=1, low_open=True, high_open=True)  # fmt: skip
        check_number(self, "inner_steps (D1 steps per D2 step)", self.inner_steps, low=1, integer=True)
        check_number(self, "orth_reg_weight", self.orth_reg_weight, low=0, finite=True)

    def initialize(self, weights, names, calibration=None) -> Init:
        return triplet_init(self, weights, names)

    def regularizer(self, layer) -> Tensor | None:
        """γ·½(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F), averaged over the layers by svdkit.regularization."""
        return None if self.orth_reg_weight == 0 else self.orth_reg_weight * 0.5 * orthogonality(layer.lora_B, layer.lora_A)

    # -- the two splits ----------------------------------------------------------------------------------
    def second_split(self) -> float:
        return self.split_fraction

    def split_at(self, step: int) -> int:
        """``inner_steps`` D₁ steps, then one D₂ step: step t is a D₂ step when t mod (inner_steps + 1) = inner_steps."""
        return 2 if step % (self.inner_steps + 1) == self.inner_steps else 1

    def split_of(self, tensor: str) -> int:
        """λ (the core) trains on D₂, P and Q on D₁."""
        return 2 if tensor == VALUES else 1
