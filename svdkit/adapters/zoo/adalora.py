"""AdaLoRA: an SVD-shaped update P diag(λ) Q whose triplets are pruned to a shrinking rank budget (METHODS.md §16).

    ΔW = s·P diag(λ) Q,   P = B (m × r₀), Q = A (r₀ × n), λ (r₀) a trainable diagonal core,  s = α/r₀

The schedule runs by itself in svdkit's training loop and under ``svdkit.training.hf.SvdkitTrainer``:
``after_clipping`` (gradients exist, before the optimizer step) updates the sensitivity EMAs of every
entry of P, λ, Q; ``after_step`` applies the cubic budget b(t) and zeroes the λᵢ of the lowest-scoring
triplets. The EMAs, masks and phase live in each layer's ``method_state`` (non-persistent buffers), which
``svdkit.training_state(model)`` hands to checkpoints, so ``svdkit finetune --resume`` continues exactly; a
step counter that restarts begins a new run with fresh state (a run resumed without that state recovers a
final mask in force from the exact zeros in λ).
``ranks(model)`` reads the current ranks nnz(λ); ``export_peft`` writes each layer at rank nnz(λ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init
from svdkit.adapters.rank_schedule import (  # noqa: F401  (budget_schedule, triplet_scores: public here too)
    INIT_STD, allocate_by_score, budget_schedule, run_schedule, triplet_init, triplet_scores, update_sensitivities,
)
from svdkit.core.checks import check_number
from svdkit.core.linalg_rank import orthogonality as factor_orthogonality


def orthogonality(layer) -> Tensor:
    """‖PᵀP − I‖_F + ‖QQᵀ − I‖_F of one layer (not squared)."""
    return factor_orthogonality(layer.lora_B, layer.lora_A)


@register
@dataclass(frozen=True)
class AdaLoRA(AdapterConfig):
    """AdaLoRA (https://arxiv.org/abs/2303.10512): ΔW = (α/r₀)·P diag(λ) Q with importance-driven rank pruning.

    Init: P, Q ~ N(0, 0.02²) (seeded per layer), λ = 0, so the update is zero at init. Trains r₀(m+n+1)
    per matrix (r₀ = ``rank``, PEFT's init_r). s = α/r₀ with α = None meaning α = r₀ (s = 1; PEFT's
    lora_alpha defaults to 8, and PEFT divides by r₀ + 1e-5).
    Loss: L + γ·mean over the factor matrices P, Q of all adapted layers of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F
    (``orth_reg_weight`` = γ), i.e. γ·Σ_layers(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F)/(2L): PEFT's normalization
    (``AdaLoraModel.forward`` divides by the number of factor matrices), norms not squared.
    Sensitivity per entry, with the pre-step weights and the clipped gradient (``after_clipping``):
    I = |w·∂L/∂w|, Ī ← β₁Ī + (1 − β₁)I, Ū ← β₂Ū + (1 − β₂)|I − Ī|, s = Ī·Ū; triplet score
    Sᵢ = s(λᵢ) + mean_j s(Q_ij) + mean_j s(P_ji). Budget (``after_step(t, T)``, T from the training loop):
    b₀ = Σ r₀ until t_i, then ⌊b_T + (b₀ − b_T)(1 − (t − t_i)/(T − t_f − t_i))³⌋, b_T = target_r × layers;
    every ΔT steps the λᵢ with Sᵢ at or below the (b₀ − b)-th smallest score are zeroed and held at 0 until
    the next allocation; at t = T − t_f the final allocation (budget b_T) is fixed for the rest of the run.
    The budget and the mean are over the layers sharing one config (all of them unless overrides split).
    Defaults: rank (init_r) 12, target_r 8, β₁ = β₂ = 0.85, t_i = t_f = 0, ΔT = 1 (PEFT's); γ = 0.1 (the
    paper's; PEFT 0.5); lr 5e-4 (the paper's DeBERTaV3-base MNLI setting); weight decay 0.
    Paper/PEFT vs here: PEFT scores with the post-step weights (it runs after ``optimizer.step()``) while
    the paper's Algorithm 1, and this code, use the weights the gradient was taken at; PEFT lets pruned λᵢ
    move again between allocations when ΔT > 1, here they stay 0; PEFT fails when b = b₀ at an allocation
    (target_r = init_r), here nothing is pruned. With ΔT = 1 the budget and the masks equal PEFT's
    RankAllocator given the same weights and gradients (tests/test_zoo_adalora.py).
    """

    rank: int = 12
    target_r: int = 8
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1

    name = "adalora"
    lr = 5e-4
    basis = "random (P, Q ~ N(0, 0.02)), λ = 0"
    trains = "P, λ, Q (B, C, A); budgeted triplet pruning"
    params = "r(m+n+1)"
    export_rank = "nnz(λ) per layer"
    paper = "https://arxiv.org/abs/2303.10512"
    prunes = True  # export_peft leaves the zeroed λ_i out: rank nnz(λ) per layer
    regularizer_mean = True  # svdkit.regularization averages the per-layer terms over the layers

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        check_number(self, "target_r (the average final rank per matrix)", self.target_r, low=1, integer=True)
        if self.target_r > self.rank:
            raise ValueError(f"{cls}: target_r ({self.target_r}) must be <= rank, the initial rank ({self.rank}).")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            check_number(self, f"{name} (an EMA factor)", beta, low=0, high=1, low_open=True, high_open=True)
        check_number(self, "orth_reg_weight", self.orth_reg_weight, low=0, finite=True)
        check_number(self, "tinit (warm-up steps before pruning)", self.tinit, low=0, integer=True)
        check_number(self, "tfinal (final steps at the target budget)", self.tfinal, low=0, integer=True)
        check_number(self, "deltaT (steps between budget allocations)", self.deltaT, low=1, integer=True)

    def initialize(self, weights, names, calibration=None) -> Init:
        return triplet_init(self, weights, names)

    core_type = Delta

    def regularizer(self, layer) -> Tensor | None:
        """γ·½(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F); ``regularizer_mean`` makes svdkit.regularization average these over
        the layers, so the total is γ times PEFT's mean over the 2L factor matrices."""
        return None if self.orth_reg_weight == 0 else self.orth_reg_weight * 0.5 * orthogonality(layer)

    # -- the schedule (svdkit.adapters.rank_schedule) --------------------------------------------------
    def after_clipping(self, layers: dict, peak_lr: float) -> None:
        """Ī ← β₁Ī + (1 − β₁)I and Ū ← β₂Ū + (1 − β₂)|I − Ī| with I = |w·∂L/∂w| (until the final allocation)."""
        update_sensitivities(layers, self.beta1, self.beta2)

    def after_step(self, layers: dict, step: int, total_steps: int) -> None:
        """Allocate the budget b(step) (every ΔT steps, and finally at T − t_f) and hold pruned λᵢ at 0."""
        run_schedule(self, layers, step, total_steps, allocate_by_score)


def ranks(model) -> dict[str, int]:
    """Current rank nnz(λ) of every AdaLoRA layer of ``model`` (0 before training: λ starts at 0)."""
    from svdkit.adapters.api import adapted_layers, state

    configs = state(model).module_configs
    out = {name: int(torch.count_nonzero(layer.core.value)) for name, layer in adapted_layers(model)
           if isinstance(configs[name], AdaLoRA)}  # fmt: skip
    if not out:
        raise ValueError("this model has no AdaLoRA layers; adapt it with svdkit.AdaLoRA(...) first.")
    return out


