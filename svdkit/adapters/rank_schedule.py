"""Rank schedules over SVD-shaped triplets P diag(λ) Q (AdaLoRA, Lingo): one home for the parts they share.

    ΔW = s·P diag(λ) Q,   P = B (m × r₀), Q = A (r₀ × n), λ (r₀) the layer's diagonal core (``core.value``)

- :func:`triplet_init`: P, Q ~ N(0, 0.02²) seeded per layer, λ = 0 (also BiLoRA's parametrization);
- :func:`update_sensitivities`: the sensitivity EMAs Ī, Ū of every entry of P, λ, Q (``after_clipping``);
- :func:`triplet_scores`: Sᵢ = s(λᵢ) + mean_j s(Q_ij) + mean_j s(P_ji), s = Ī·Ū;
- :func:`budget_schedule`: AdaLoRA's cubic budget b(t);
- :func:`run_schedule`: the per-step driver (``after_step``): phases, resets, the final allocation, holding the
  pruned λᵢ at 0. What a method does at an allocation is its ``allocate(layers, n_pruned, step, final)`` callable:
  AdaLoRA's :func:`allocate_by_score`, Lingo's score-plus-re-introduction.

Every piece of state lives in each layer's ``method_state`` (non-persistent buffers that
``svdkit.training_state`` hands to checkpoints), so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from svdkit.adapters.layers import Init
from svdkit.core.linalg import layer_seed

INIT_STD = 0.02  # P, Q ~ N(0, 0.02²), as AdaLoRA's code and PEFT
_KEYS = {"P": "P", "λ": "lambda", "Q": "Q"}  # buffer names: avg_P, unc_lambda, …


def triplet_init(cfg, weights: Tensor, names) -> Init:
    """P (b, m, r), Q (b, r, n) ~ N(0, INIT_STD²) from each layer's seeded generator, λ = 0: the update is zero."""
    b, m, n = weights.shape
    A, B = torch.empty(b, cfg.rank, n, dtype=cfg.dtype), torch.empty(b, m, cfg.rank, dtype=cfg.dtype)
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(layer_seed(cfg.seed, name))
        A[i].normal_(0.0, INIT_STD, generator=gen)
        B[i].normal_(0.0, INIT_STD, generator=gen)
    device = weights.device
    return Init(A=A.to(device), B=B.to(device), subtract=False,
                core={"value": torch.zeros(b, cfg.rank, dtype=cfg.dtype, device=device)})  # fmt: skip


class LayerState:
    """One layer's schedule state, kept as tensors in ``layer.method_state`` (saved by checkpoints):
    ``avg_*`` Ī and ``unc_*`` Ū per factor (absent: zeros), ``keep`` the bool λ mask (False = pruned, λᵢ held
    at 0; absent: no allocation yet), ``phase`` = [update_next, final, step, total]: update_next is 0 once
    the next step is the final allocation or later (no more EMAs), final is 1 once ``keep`` is fixed for
    the rest of the run, and (step, total) the last step seen and its run's length. A method may keep more
    tensors in ``store`` (Lingo's re-introduction gains); ``reset`` clears them too."""

    def __init__(self, layer):
        self.store = layer.method_state
        phase = self.store.get("phase")
        self.update_next, self.final, self.step, self.total = (1, 0, 0, 0) if phase is None else phase.tolist()

    def ema(self, kind: str, key: str) -> Tensor | None:
        return self.store.get(f"{kind}_{_KEYS[key]}")

    def set_ema(self, kind: str, key: str, value: Tensor) -> None:
        self.store.set(f"{kind}_{_KEYS[key]}", value)

    @property
    def keep(self) -> Tensor | None:
        return self.store.get("keep")

    @keep.setter
    def keep(self, value: Tensor) -> None:
        self.store.set("keep", value)

    def save_phase(self) -> None:
        values = [int(self.update_next), int(self.final), int(self.step), int(self.total)]
        self.store.set("phase", torch.tensor(values, dtype=torch.int64))

    def reset(self) -> None:
        self.store.clear()
        self.update_next, self.final, self.step, self.total = 1, 0, 0, 0

    def drop_emas(self) -> None:
        for kind in ("avg", "unc"):
            for key in _KEYS.values():
                self.store.pop(f"{kind}_{key}")


def factors(layer) -> dict[str, Tensor]:
    """The trained tensors of one layer by their paper names: P (m×r₀), λ (r₀), Q (r₀×n)."""
    return {"P": layer.lora_B, "λ": layer.core.value, "Q": layer.lora_A}


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
    st, f = LayerState(layer), factors(layer)
    score = {k: st.ema("avg", k) * st.ema("unc", k) if st.ema("avg", k) is not None else torch.zeros_like(f[k])
             for k in f}  # fmt: skip
    return (score["λ"] + score["Q"].mean(dim=1) + score["P"].mean(dim=0)).detach()


def update_sensitivities(layers: dict, beta1: float, beta2: float) -> None:
    """Ī ← β₁Ī + (1 − β₁)I and Ū ← β₂Ū + (1 − β₂)|I − Ī| with I = |w·∂L/∂w| (until the final allocation)."""
    with torch.no_grad():
        for layer in layers.values():
            st = LayerState(layer)
            if not st.update_next:
                continue
            for key, p in factors(layer).items():
                if p.grad is None:
                    continue
                sens = (p * p.grad).abs()
                old_avg, old_unc = st.ema("avg", key), st.ema("unc", key)
                avg = beta1 * (torch.zeros_like(p) if old_avg is None else old_avg) + (1 - beta1) * sens
                unc = beta2 * (torch.zeros_like(p) if old_unc is None else old_unc) + (1 - beta2) * (sens - avg).abs()
                st.set_ema("avg", key, avg)
                st.set_ema("unc", key, unc)


def allocate_by_score(layers: list, n_pruned: int, step: int = 0, final: bool = False) -> None:
    """keep = (Sᵢ > the n_pruned-th smallest score over all the layers' triplets); nothing if n_pruned ≤ 0."""
    scores = [triplet_scores(layer) for layer in layers]
    if n_pruned <= 0:
        keeps = [torch.ones_like(s, dtype=torch.bool) for s in scores]
    else:
        threshold = torch.kthvalue(torch.cat(scores), n_pruned).values
        keeps = [s > threshold for s in scores]
    for layer, keep in zip(layers, keeps):
        LayerState(layer).keep = keep


def run_schedule(cfg, layers: dict, step: int, total_steps: int,
                 allocate: Callable[[list, int, int, bool], None]) -> None:  # fmt: skip
    """After optimizer step ``step`` of ``total_steps``: allocate the budget b(step) of ``cfg`` (its rank,
    target_r, tinit, tfinal, deltaT) over ``layers`` with ``allocate(layers, n_pruned, step, final)`` (every
    ΔT steps, and finally at T − t_f, ``final`` True, after which the masks are fixed), then hold the pruned λᵢ at 0."""
    if not layers:
        return
    name, last = type(cfg).__name__, total_steps - cfg.tfinal
    if cfg.tinit >= last:
        raise ValueError(f"{name}: tinit ({cfg.tinit}) + tfinal ({cfg.tfinal}) leave no pruning phase in "
                         f"{total_steps} training steps; lower them or train for more steps.")  # fmt: skip
    names = sorted(layers)
    states = [LayerState(layers[n]) for n in names]
    if any(st.step >= step or st.total not in (0, total_steps) for st in states):
        for st in states:  # a new run on the same model (the step counter restarted): fresh state
            st.reset()
    for st in states:
        st.step, st.total = step, total_steps
    if step > last and any(st.keep is None for st in states):  # resumed in the final phase: λ's zeros
        for n, st in zip(names, states):
            st.keep, st.final = layers[n].core.value.detach() != 0, True
    if step <= last and not states[0].final:
        init_budget = sum(layers[n].core.value.numel() for n in names)
        budget, due = budget_schedule(step, total_steps, init_budget, cfg.target_r * len(names), cfg.tinit,
                                      cfg.tfinal, cfg.deltaT)  # fmt: skip
        if due:
            allocate([layers[n] for n in names], init_budget - budget, step, step == last)
        for st in states:
            st.update_next = step + 1 < last
            if step == last:
                st.final = True
                st.drop_emas()
    for st in states:
        st.save_phase()
    with torch.no_grad():
        for n, st in zip(names, states):
            if st.keep is not None:
                layers[n].core.value.masked_fill_(~st.keep, 0.0)
