"""Lingo's adaptive rank sampling: AdaLoRA's budgeted pruning of singular directions, made stochastic.

    ΔW = s·P diag(λ) Q   (AdaLoRA's triplets; svdkit.adapters.rank_schedule)

Zhan & Zhang, "Parameter-Efficient Fine-Tune on Open Pre-trained Transformers for Genomic Sequence", NeurIPS
2023 GenBio workshop; code https://github.com/zhanglab-aim/LINGO (``peftnew/tuners/adalora.py``,
``mask_to_budget``). AdaLoRA prunes the lowest-scoring triplets (Pᵢ, λᵢ, Qᵢ) to a shrinking budget and never
brings one back. Two rules for bringing them back:

* ``sampling="code"`` (default, the released code): at every allocation the score threshold splits the
  triplets as AdaLoRA's does, then each one's side is flipped independently with probability p
  (``reintroduce``, 0.1 in the code): a triplet below the threshold stays trainable with probability p
  (re-introduced, its λᵢ reset to 0), one above it is pruned with probability p. Kept count in expectation:
  b − p·b + p·(n − b), not exactly b.
* ``sampling="gain"`` (ours): keeps the budget b exactly and gives ⌊p·b⌋ slots to pruned directions drawn
  without replacement, weighted by how much each would lower the loss if it came back: a pruned λᵢ is 0, so
  its sensitivity |λᵢ·∂L/∂λᵢ| is 0, but ∂L/∂λᵢ = s·Pᵢᵀ G Qᵢᵀ (G = ∂L/∂W) is not, and |∂L/∂λᵢ| is the
  first-order rate at which the loss falls when λᵢ leaves 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from svdkit.adapters.config import AdapterConfig
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init
from svdkit.adapters.rank_schedule import LayerState, run_schedule, triplet_init, triplet_scores, update_sensitivities
from svdkit.core.checks import check_number
from svdkit.core.linalg import layer_seed
from svdkit.core.linalg_rank import orthogonality
from svdkit.core.registry import register

GAIN = "gain_lambda"  # method_state key: the EMA of |∂L/∂λᵢ|


def gains(layer) -> Tensor:
    """The re-introduction gain EMA ḡᵢ of every triplet of one layer (zeros before the first gradient)."""
    g = layer.method_state.get(GAIN)
    return torch.zeros_like(layer.core.value.detach()) if g is None else g


def flip_sides(keep: Tensor, p: float, gen) -> Tensor:
    """The released code's sampling: every entry of the by-score ``keep`` mask flips independently with
    probability p (a pruned triplet is kept, a kept one pruned)."""
    flips = torch.rand(keep.shape, generator=gen) < p
    return keep.cpu() ^ flips


def reintroduce(scores: Tensor, pruned: Tensor, gain: Tensor, keep_count: int, slots: int, gen) -> Tensor:
    """The kept set over all triplets (flattened): the top ``keep_count − slots`` by score, then ``slots`` of the
    other, currently ``pruned`` triplets drawn without replacement with probability ∝ gᵢ + ḡ (ḡ the candidates'
    mean gain: every candidate keeps at least half an average chance; all gains 0 → uniform); slots left
    when there are too few candidates go to the next best by score. Ties in score break by index."""
    n = scores.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    keep_count = max(0, min(keep_count, n))
    slots = max(0, min(slots, keep_count))
    order = torch.sort(scores.cpu().double(), descending=True, stable=True).indices
    keep[order[: keep_count - slots]] = True
    candidates = torch.nonzero(pruned.cpu() & ~keep).flatten()
    drawn = min(slots, candidates.numel())
    if drawn:
        g = gain.cpu().double()[candidates]
        weights = g + g.mean() if float(g.sum()) > 0 else torch.ones_like(g)
        keep[candidates[torch.multinomial(weights, drawn, replacement=False, generator=gen)]] = True
    rest = [int(i) for i in order if not keep[i]]
    keep[rest[: keep_count - int(keep.sum())]] = True
    return keep


@register
@dataclass(frozen=True)
class Lingo(AdapterConfig):
    """Lingo: AdaLoRA's budgeted pruning of P diag(λ) Q triplets, with stochastic re-introduction of pruned ones.

    Shared with AdaLoRA (svdkit.adapters.rank_schedule): init P, Q ~ N(0, 0.02²), λ = 0 (zero update);
    r₀(m + n + 1) trainable values per matrix; the sensitivity EMAs Ī, Ū of every entry and the triplet score
    Sᵢ; the cubic budget b(t) from b₀ = Σr₀ to b_T = target_r × layers between t_i and T − t_f; the
    orthogonality regularizer γ·½(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F) averaged over the layers; pruned λᵢ held at 0.
    Lingo's own part, at each allocation (every ΔT steps up to T − t_f, the last one fixing the masks for
    the rest of the run) with budget b, after the by-score split:

    * ``sampling="code"`` (default; the released code's ``mask_to_budget``): each triplet's side of the
      threshold flips independently with probability p = ``reintroduce`` (0.1 in the code) — a pruned one
      stays trainable, a kept one is pruned — at the final allocation too (the code's final rank pattern is
      the same sampled mask); every triplet below the threshold has its λᵢ set to 0, so a re-introduced one
      restarts from 0 and the function does not jump.
    * ``sampling="gain"`` (ours, budget-exact): keep the top b − k by Sᵢ and give k = ⌊p·b⌋ slots to triplets
      that were pruned, drawn without replacement with probability ∝ ḡᵢ + mean(ḡ) over the candidates, where
      ḡᵢ ← β₁ḡᵢ + (1 − β₁)|∂L/∂λᵢ| (``after_clipping``, with the clipped gradient; the only first-order
      signal a pruned direction has; the mean-gain floor keeps the draw stochastic); the final allocation is
      by score alone.

    Draws are seeded by (seed, step), so a resumed run draws the same; ḡ, Ī, Ū, the masks and the phase are
    layer state that checkpoints save. Export: rank nnz(λ) per layer (pruned directions left out). Other
    choices: AdaLoRA's parametrization, scores and budget (the code is a fork of PEFT's AdaLoRA); ΔT = 10;
    t_i = t_f = 0, β₁ = β₂ = 0.85, rank 12, target_r 8, γ = 0.1, lr 5e-4 (AdaLoRA's). Adam's moments of a
    pruned λᵢ are not reset at re-introduction (nor in the code).
    """

    rank: int = 12
    target_r: int = 8
    reintroduce: float = 0.1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 10
    sampling: str = "code"

    name = "lingo"
    lr = 5e-4
    basis = "random (P, Q ~ N(0, 0.02)), λ = 0"
    trains = "P, λ, Q; budgeted pruning + stochastic re-introduction"
    params = "r(m+n+1)"
    export_rank = "nnz(λ) per layer"
    paper = "https://github.com/zhanglab-aim/LINGO (Zhan & Zhang, NeurIPS 2023 GenBio workshop)"
    prunes = True
    regularizer_mean = True
    core_type = Delta

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "target_r (the average final rank per matrix)", self.target_r, low=1, integer=True)
        if self.target_r > self.rank:
            raise ValueError(f"Lingo: target_r ({self.target_r}) must be <= rank, the initial rank ({self.rank}).")
        check_number(self, "reintroduce (the budget share for re-introduced directions)", self.reintroduce,
                     low=0, high=1, high_open=True)  # fmt: skip
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            check_number(self, f"{name} (an EMA factor)", beta, low=0, high=1, low_open=True, high_open=True)
        check_number(self, "orth_reg_weight", self.orth_reg_weight, low=0, finite=True)
        check_number(self, "tinit (warm-up steps before pruning)", self.tinit, low=0, integer=True)
        check_number(self, "tfinal (final steps at the target budget)", self.tfinal, low=0, integer=True)
        check_number(self, "deltaT (steps between budget allocations)", self.deltaT, low=1, integer=True)
        if self.sampling not in ("code", "gain"):
            raise ValueError(f"Lingo: sampling must be 'code' (the released code's random flips) or 'gain' "
                             f"(budget-exact, gain-weighted draw), got {self.sampling!r}.")

    def initialize(self, weights, names, calibration=None) -> Init:
        return triplet_init(self, weights, names)

    def regularizer(self, layer) -> Tensor | None:
        return None if self.orth_reg_weight == 0 else self.orth_reg_weight * 0.5 * orthogonality(layer.lora_B, layer.lora_A)

    def after_clipping(self, layers: dict, peak_lr: float) -> None:
        """AdaLoRA's sensitivity EMAs, and ḡᵢ ← β₁ḡᵢ + (1 − β₁)|∂L/∂λᵢ| for every triplet (pruned ones included)."""
        update_sensitivities(layers, self.beta1, self.beta2)
        with torch.no_grad():
            for layer in layers.values():
                grad = layer.core.value.grad
                if grad is not None and LayerState(layer).update_next:
                    layer.method_state.set(GAIN, self.beta1 * gains(layer) + (1 - self.beta1) * grad.abs())

    def after_step(self, layers: dict, step: int, total_steps: int) -> None:
        run_schedule(self, layers, step, total_steps, self._allocate)

    def _allocate(self, layers: list, n_pruned: int, step: int, final: bool) -> None:
        scores = [triplet_scores(layer) for layer in layers]
        sizes = [s.numel() for s in scores]
        budget = sum(sizes) - max(0, n_pruned)
        gen = torch.Generator().manual_seed(layer_seed(self.seed, f"lingo-step-{step}"))
        if self.sampling == "code":
            by_score = reintroduce(torch.cat(scores), torch.zeros(sum(sizes), dtype=torch.bool), torch.zeros(sum(sizes)),
                                   budget, 0, gen)  # fmt: skip
            keep = flip_sides(by_score, self.reintroduce, gen)
            with torch.no_grad():
                for layer, below, part in zip(layers, (~by_score).split(sizes), keep.split(sizes)):
                    layer.core.value.masked_fill_(below.to(layer.core.value.device), 0.0)
                    LayerState(layer).keep = part.to(layer.core.value.device)
            return
        slots = 0 if final else int(self.reintroduce * budget)
        pruned = [LayerState(layer).keep for layer in layers]
        pruned = torch.cat([torch.zeros(n, dtype=torch.bool) if k is None else ~k.cpu() for k, n in zip(pruned, sizes)])
        keep = reintroduce(torch.cat(scores), pruned, torch.cat([gains(layer) for layer in layers]), budget, slots, gen)
        for layer, part in zip(layers, keep.split(sizes)):
            LayerState(layer).keep = part.to(layer.core.value.device)
