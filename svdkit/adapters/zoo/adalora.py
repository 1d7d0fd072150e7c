"""AdaLoRA: an SVD-shaped update P diag(λ) Q whose triplets are pruned to a shrinking rank budget (METHODS.md §16).

    ΔW = s·P diag(λ) Q,   P = B (m × r₀), Q = A (r₀ × n), λ (r₀) a trainable diagonal core,  s = α/r₀

The schedule runs by itself in svdkit's training loop and under ``svdkit.training.hf.SvdkitTrainer``:
``after_clipping`` (gradients exist, before the optimizer step) updates the sensitivity EMAs of every
entry of P, λ, Q; ``after_step`` applies the cubic budget b(t) and zeroes the λᵢ of the lowest-scoring
triplets. The EMAs and masks live in a module-level table keyed by layer and last one run: a step counter
that restarts begins a new run with fresh state; a resumed run starts its EMAs from zero (a final mask in
force is recovered from the exact zeros in λ).
``ranks(model)`` reads the current ranks nnz(λ); ``export_peft`` writes each layer at rank nnz(λ).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init
from svdkit.core.linalg import layer_seed
from svdkit.adapters.zoo.sorsa import check_weights, gram_deviation

INIT_STD = 0.02  # P, Q ~ N(0, 0.02²), as the paper's code and PEFT


@dataclass
class _LayerState:
    """One layer's allocator state: Ī and Ū per factor ("P", "λ", "Q"), its λ mask, and the phase flags."""

    avg: dict = field(default_factory=dict)  # Ī: smoothed sensitivity
    unc: dict = field(default_factory=dict)  # Ū: smoothed uncertainty |I − Ī|
    keep: Tensor | None = None  # bool (r₀,): False = the triplet is pruned (λᵢ held at 0)
    update_next: bool = True  # False once the next step is the final allocation or later (no more EMAs)
    final: bool = False  # the final allocation is done: ``keep`` is fixed for the rest of the run
    step: int = 0  # the last step seen and its run's length: a step that does not follow starts a new run
    total: int = 0


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _state(layer) -> _LayerState:
    if layer not in _STATES:
        _STATES[layer] = _LayerState()
    return _STATES[layer]


def _factors(layer) -> dict[str, Tensor]:
    """The trained tensors of one layer by their paper names: P (m×r₀), λ (r₀), Q (r₀×n)."""
    return {"P": layer.lora_B, "λ": layer.core.value, "Q": layer.lora_A}


def orthogonality(layer) -> Tensor:
    """‖PᵀP − I‖_F + ‖QQᵀ − I‖_F of one layer (not squared)."""
    return gram_deviation(layer.lora_B, rows=False) + gram_deviation(layer.lora_A, rows=True)


def budget_schedule(step: int, total: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    delta_t: int) -> tuple[int, bool]:  # fmt: skip
    """(b(t), whether step t allocates). b = b₀ for t ≤ t_i; b_T for t > T − t_f; between them
    ⌊b_T + (b₀ − b_T)(1 − (t − t_i)/(T − t_f − t_i))³⌋, allocating when t % ΔT == 0 (and always at T − t_f)."""
    if step <= tinit:
        return init_budget, False
    if step >= total - tfinal:
        return target_budget, True
    cubic = (1 - (step - tinit) / (total - tfinal - tinit)) ** 3
    return int((init_budget - target_budget) * cubic + target_budget), step % delta_t == 0


def triplet_scores(layer) -> Tensor:
    """Sᵢ = s(λᵢ) + mean_j s(Q_ij) + mean_j s(P_ji), s = Ī·Ū per entry (zeros before any sensitivity)."""
    st, f = _state(layer), _factors(layer)
    score = {k: st.avg[k] * st.unc[k] if k in st.avg else torch.zeros_like(f[k]) for k in f}
    return (score["λ"] + score["Q"].mean(dim=1) + score["P"].mean(dim=0)).detach()


def _int_at_least(cfg, field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{type(cfg).__name__}: {field} must be an integer >= {low}, got {value!r}.")


@register
@dataclass(frozen=True)
class AdaLoRA(AdapterConfig):
    """AdaLoRA (https://arxiv.org/abs/2303.10512): ΔW = (α/r₀)·P diag(λ) Q with importance-driven rank pruning.

    Init: P, Q ~ N(0, 0.02²) (seeded per layer), λ = 0, so the update is zero at init. Trains r₀(m+n+1)
    per matrix (r₀ = ``rank``, PEFT's init_r). s = α/r₀ with α = None meaning α = r₀ (s = 1; PEFT's
    lora_alpha defaults to 8, and PEFT divides by r₀ + 1e-5).
    Loss: L + γ·mean over the adapted matrices of (‖PᵀP − I‖_F + ‖QQᵀ − I‖_F) (``orth_reg_weight`` = γ;
    norms not squared, as METHODS.md and the official code; the paper's R may square them [?, unchecked]).
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
    move again between allocations when ΔT > 1, here they stay 0; PEFT's regularizer is the mean over the
    factor matrices (2 per layer), half of this per-matrix mean; PEFT fails when b = b₀ at an allocation
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
        _int_at_least(self, "target_r (the average final rank per matrix)", self.target_r, 1)
        if self.target_r > self.rank:
            raise ValueError(f"{cls}: target_r ({self.target_r}) must be <= rank, the initial rank ({self.rank}).")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < 1:
                raise ValueError(f"{cls}: {name} (an EMA factor) must be a number in (0, 1), got {beta!r}.")
        check_weights(self, orth_reg_weight=self.orth_reg_weight)
        _int_at_least(self, "tinit (warm-up steps before pruning)", self.tinit, 0)
        _int_at_least(self, "tfinal (final steps at the target budget)", self.tfinal, 0)
        _int_at_least(self, "deltaT (steps between budget allocations)", self.deltaT, 1)

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        A, B = torch.empty(b, self.rank, n, dtype=self.dtype), torch.empty(b, m, self.rank, dtype=self.dtype)
        for i, name in enumerate(names):
            gen = torch.Generator().manual_seed(layer_seed(self.seed, name))
            A[i].normal_(0.0, INIT_STD, generator=gen)
            B[i].normal_(0.0, INIT_STD, generator=gen)
        device = weights.device
        return Init(A=A.to(device), B=B.to(device), subtract=False,
                    core={"value": torch.zeros(b, self.rank, dtype=self.dtype, device=device)})  # fmt: skip

    core_type = Delta

    def regularizer(self, layer) -> Tensor | None:
        """γ·(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F); ``regularizer_mean`` makes svdkit.regularization average these."""
        return None if self.orth_reg_weight == 0 else self.orth_reg_weight * orthogonality(layer)

    # -- the schedule -----------------------------------------------------------------------------------
    def after_clipping(self, layers: dict, peak_lr: float) -> None:
        """Ī ← β₁Ī + (1 − β₁)I and Ū ← β₂Ū + (1 − β₂)|I − Ī| with I = |w·∂L/∂w| (until the final allocation)."""
        with torch.no_grad():
            for layer in layers.values():
                st = _state(layer)
                if not st.update_next:
                    continue
                for key, p in _factors(layer).items():
                    if p.grad is None:
                        continue
                    sens = (p * p.grad).abs()
                    avg = self.beta1 * st.avg.get(key, torch.zeros_like(p)) + (1 - self.beta1) * sens
                    unc = self.beta2 * st.unc.get(key, torch.zeros_like(p)) + (1 - self.beta2) * (sens - avg).abs()
                    st.avg[key], st.unc[key] = avg, unc

    def after_step(self, layers: dict, step: int, total_steps: int) -> None:
        """Allocate the budget b(step) (every ΔT steps, and finally at T − t_f) and hold pruned λᵢ at 0."""
        if not layers:
            return
        last = total_steps - self.tfinal
        if self.tinit >= last:
            raise ValueError(f"AdaLoRA: tinit ({self.tinit}) + tfinal ({self.tfinal}) leave no pruning phase in "
                             f"{total_steps} training steps; lower them or train for more steps.")  # fmt: skip
        names = sorted(layers)
        if any(_state(layers[n]).step >= step or _state(layers[n]).total not in (0, total_steps) for n in names):
            for n in names:  # a new run on the same model (the step counter restarted): fresh state
                _STATES[layers[n]] = _LayerState()
        states = [_state(layers[n]) for n in names]
        for st in states:
            st.step, st.total = step, total_steps
        if step > last and any(st.keep is None for st in states):  # resumed in the final phase: λ's zeros
            for n, st in zip(names, states):
                st.keep, st.final = layers[n].core.value.detach() != 0, True
        if step <= last and not states[0].final:
            init_budget = sum(layers[n].core.value.numel() for n in names)
            budget, allocate = budget_schedule(step, total_steps, init_budget, self.target_r * len(names),
                                               self.tinit, self.tfinal, self.deltaT)  # fmt: skip
            if allocate:
                self._allocate([layers[n] for n in names], init_budget - budget)
            for st in states:
                st.update_next = step + 1 < last
                if step == last:
                    st.final, st.avg, st.unc = True, {}, {}
        with torch.no_grad():
            for n, st in zip(names, states):
                if st.keep is not None:
                    layers[n].core.value.masked_fill_(~st.keep, 0.0)

    def _allocate(self, layers: list, n_pruned: int) -> None:
        """keep = (Sᵢ > the n_pruned-th smallest score over all the layers' triplets); nothing if n_pruned ≤ 0."""
        scores = [triplet_scores(layer) for layer in layers]
        if n_pruned <= 0:
            keeps = [torch.ones_like(s, dtype=torch.bool) for s in scores]
        else:
            threshold = torch.kthvalue(torch.cat(scores), n_pruned).values
            keeps = [s > threshold for s in scores]
        for layer, keep in zip(layers, keeps):
            _state(layer).keep = keep


def ranks(model) -> dict[str, int]:
    """Current rank nnz(λ) of every AdaLoRA layer of ``model`` (0 before training: λ starts at 0)."""
    from svdkit.adapters.api import adapted_layers, state

    configs = state(model).module_configs
    out = {name: int(torch.count_nonzero(layer.core.value)) for name, layer in adapted_layers(model)
           if isinstance(configs[name], AdaLoRA)}  # fmt: skip
    if not out:
        raise ValueError("this model has no AdaLoRA layers; adapt it with svdkit.AdaLoRA(...) first.")
    return out


