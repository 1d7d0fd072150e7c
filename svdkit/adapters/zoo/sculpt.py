"""Sculpting Subspaces (OSFT): continual full fine-tuning orthogonal to each weight's critical directions.

Nayak et al. 2025, https://arxiv.org/abs/2504.07097. After each task, the SVD of every weight W = UΣVᵀ
splits it into a high-energy (protected) part U_k Σ_k V_kᵀ and the rest; on the next task every update of
that weight is projected onto the two-sided orthogonal complement

    ΔW ← P(ΔW) = (I − U_k U_kᵀ) ΔW (I − V_k V_kᵀ),        so U_kᵀ ΔW = 0 and ΔW V_k = 0,

which leaves the protected triplets exactly singular triplets of the new weight (W' V_k = U_k Σ_k).

Choices (the paper leaves them open or we deviate, stated):
- Parametrization: the full weight trains (as ``full``: C = W at init, frozen copy C₀, ΔW = C − C₀); the
  paper re-parametrizes the low-energy part as trainable factors. Same update space, simpler state.
- Rank: k = the smallest rank holding ``energy`` (default 0.9) of ‖W‖_F² (``energy_rank``); on the default
  model 0.9 keeps 12–68 % of the directions per matrix. ``ratio=r`` instead protects a fixed share of every
  matrix, k = min(⌊r·min(m, n)⌋, min(m, n) − 1) — the rule of the authors' released trainer
  (Red-Hat-AI-Innovation-Team/mini_trainer, ``rank_ratio``, default 0.5 there). The paper's own rule maps a
  per-layer importance (mean cosine similarity of a layer's inputs and outputs on the previous task's data)
  to a ratio between a minimum and a target retention ratio, r_l = mrr + I_l (trr − mrr); it needs
  calibration passes per task and is not implemented (the paper does not define the cosine for m ≠ n).
- The first task is protected too (``protect_base=True``: the pre-trained weight's top-k directions, as the
  paper and PEFT's OSF do, so general abilities are kept); ``protect_base=False`` trains task 1 freely.
- After each task (``svdkit.continual`` calls ``svdkit.after_task``) the basis is recomputed from the
  current weight, which holds every task so far; the old basis is replaced, not accumulated.
- ``project``: ``"gradient"`` is the paper's rule (project ∇W before the optimizer; AdamW's element-wise
  scaling and weight decay then move the update slightly out of the complement); ``"update"`` re-projects
  after every optimizer step: W ← P(W) + U_k Σ_k V_kᵀ, which equals W_task-start + P(accumulated update)
  (see :func:`svdkit.core.linalg_project.protect`), so the protection is exact whatever the optimizer
  (the default: exact at the cost of one projection); ``"both"`` does both (the moments see projected
  gradients too). Each projection costs 4·m·n·k multiply-adds per matrix and step — on the default
  model's MLPs (k ≈ 0.65·576) more than the training step itself on a CPU; attention matrices are cheap.
- The bases are per-layer method state (``method_state``: saved by checkpoints, so a resumed run keeps
  them); they are computed lazily at the first training step when missing.
- Learning rate 2e-5 and weight decay 0, as svdkit's ``full`` preset. Not low-rank: export merges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdkit.adapters.config import AdapterConfig
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init
from svdkit.core.linalg_project import complement_projection, protect, protected_basis
from svdkit.core.registry import register

KEYS = ("protect_U", "protect_S", "protect_V")
PROJECTIONS = ("gradient", "update", "both")


def protected(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The layer's protected (U_k, σ_k, V_k), or None when none was computed yet."""
    got = [layer.method_state.get(k) for k in KEYS]
    return None if any(t is None for t in got) else tuple(got)


@register
@dataclass(frozen=True)
class Sculpt(AdapterConfig):
    """Sculpting Subspaces / OSFT (https://arxiv.org/abs/2504.07097): full fine-tuning with every update
    projected orthogonal (on both sides) to the weight's top singular directions holding ``energy`` of it."""

    energy: float = 0.9
    ratio: float | None = None
    protect_base: bool = True
    project: str = "update"

    name = "sculpt"
    basis = "the weight's top singular vectors (protected)"
    trains = "W, projected off the protected subspace"
    params = "m·n"
    export_rank = "full (merge)"
    paper = "https://arxiv.org/abs/2504.07097"
    exports_lora = False
    uses_rank = False
    core_type = Delta
    lr = 2e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)) or not 0 <= self.energy < 1:
            raise ValueError(f"Sculpt: energy must be a number in [0, 1) (the share of ‖W‖² protected), got {self.energy!r}.")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float))
                                       or not 0 <= self.ratio <= 1):
            raise ValueError(f"Sculpt: ratio must be None (use energy) or a number in [0, 1] (the share of each "
                             f"matrix's directions protected), got {self.ratio!r}.")
        if not isinstance(self.protect_base, bool):
            raise ValueError(f"Sculpt: protect_base must be True or False, got {self.protect_base!r}.")
        if self.project not in PROJECTIONS:
            raise ValueError(f"Sculpt: project must be one of {PROJECTIONS}, got {self.project!r}.")

    def initialize(self, weights, names, calibration=None) -> Init:
        W = weights.to(self.dtype)
        return Init(A=None, B=None, trainable=frozenset(), subtract=False, core={"value": W.clone(), "initial": W.clone()})

    def _bases(self, layers: dict):
        for layer in layers.values():
            got = protected(layer)
            if got is None and self.protect_base:
                self.after_task({"": layer})
                got = protected(layer)
            if got is not None and got[0].shape[1] > 0:
                yield layer, got

    def after_clipping(self, layers: dict, peak_lr: float) -> None:
        bases = list(self._bases(layers))  # computed here, before the first step changes the weights
        if self.project == "update":
            return
        for layer, (U, _, V) in bases:
            grad = layer.core.value.grad
            if grad is not None:
                grad.copy_(complement_projection(grad, U, V))

    def after_step(self, layers: dict, step: int, total_steps: int) -> None:
        if self.project == "gradient":
            return
        with torch.no_grad():
            for layer, (U, S, V) in self._bases(layers):
                value = layer.core.value
                value.copy_(protect(value, U, S, V))

    def after_task(self, layers: dict) -> None:
        """Recompute each layer's protected basis from its current weight (C, which is W + ΔW)."""
        with torch.no_grad():
            for layer in layers.values():
                U, S, V = protected_basis(layer.core.value, self.energy, dtype=self.dtype, ratio=self.ratio)
                for key, t in zip(KEYS, (U, S, V)):
                    layer.method_state.set(key, t.to(layer.core.value.device))


def protected_ranks(model) -> dict[str, int]:
    """{module name: k} of a Sculpt-adapted model (0 where no basis was computed)."""
    from svdkit.adapters.api import adapted_layers

    return {name: (0 if protected(layer) is None else protected(layer)[0].shape[1]) for name, layer in adapted_layers(model)}
