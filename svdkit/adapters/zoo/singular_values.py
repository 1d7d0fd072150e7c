"""Singular-value methods: keep W and its singular vectors, train the singular values (METHODS.md §7).

    ΔW = s·U diag(σ − σ₀) Vᵀ,   B = U (m × r) and A = Vᵀ (r × n) frozen,  σ trainable from σ₀

The base weight is never touched and the update is zero at init (``cores.Delta`` measures σ from its
frozen start σ₀), so every method here preserves the function exactly at init. s scales the update:
alpha/rank for SVFit, alpha for CLIP-SVD and VectorFit, which ignore rank (alpha=None: s = 1). SVFit trains the top-r values (an exact rank-r LoRA export); CLIP-SVD
and VectorFit train all k = min(m, n) of them (rank(ΔW) can reach k: ship merged weights). VectorFit
also trains a bias Δb and freezes its most-trained vectors periodically (Adaptive Vector Freezing).
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
from svdkit.core.linalg import layer_seed, truncated_svd
from svdkit.core.linalg_rank import energy_rank

AVF_FROZEN = "avf_frozen"  # key in an adapted layer's method_state: bool per adapter parameter, frozen by AVF


def spectral_init(U: Tensor, S: Tensor, Vh: Tensor, bias: bool = False) -> Init:
    """Frozen bases B = U (b, m, r), A = Vh (b, r, n); the core trains σ from σ₀ (ΔW = 0 at init)."""
    return Init(A=Vh, B=U, trainable=frozenset(), subtract=False,
                core={"value": S, "initial": S.clone()}, bias=bias)  # fmt: skip


def full_spectrum(cfg: AdapterConfig, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """All k = min(m, n) singular triplets by exact SVD, in the config's compute dtype."""
    return truncated_svd(weights, min(weights.shape[-2:]), "top", "exact", dtype=cfg.dtype)  # cached if enabled


def training_strengths(layer) -> list[tuple[str, Tensor]]:
    """(parameter name, mean |v − v₀|) for each trainable vector of a layer: σ (from σ₀) and Δb (from 0)."""
    out = []
    for pname, p in layer.adapter_parameters():
        start = layer.core.initial if pname == "core.value" else torch.zeros_like(p)
        out.append((pname, (p.detach() - start).abs().mean()))
    return out


def avf_frozen(layer) -> frozenset[str]:
    """Names of the layer's vectors that AVF froze at the last boundary (empty before the first)."""
    mask = layer.method_state.get(AVF_FROZEN)
    if mask is None:
        return frozenset()
    return frozenset(name for (name, _), frozen in zip(layer.adapter_parameters(), mask.tolist()) if frozen)


def choose_frozen(strengths: list[float], fraction: float) -> set[int]:
    """Indices of the ⌈fraction·N⌉ largest strengths (at most N − 1); ties go to the earlier index."""
    n = min(math.ceil(fraction * len(strengths)), len(strengths) - 1)
    order = sorted(range(len(strengths)), key=lambda i: (-strengths[i], i))
    return set(order[:n])


@register
@dataclass(frozen=True)
class SVFit(AdapterConfig):
    """SVFit (https://arxiv.org/abs/2409.05926): train the top-r singular values of each weight.

    W' = W + s·U_r diag(σ − σ₀) V_rᵀ  (W = W_r + W_e with W_r = U_r diag(σ) V_rᵀ trained, W_e frozen);
    r trainable values per matrix; an exact rank-r PEFT LoRA export (B' = U_r diag(σ − σ₀), A' = V_rᵀ).
    ``svd="randomized"`` (with ``niter``/``oversample``, seeded per layer) replaces the exact SVD.
    ``energy``: the paper's abstract keeps the values "that capture over 99% of the matrix's information"
    (its exact rule could not be checked); with ``energy=e`` each layer keeps
    r_ℓ = min(rank, min{r : Σ_{i≤r} σᵢ² ≥ e·‖W‖_F²}), so ``energy=0.99`` with a large enough ``rank`` is
    the paper's setting. Default None: r = rank for every layer.
    Layers are initialized one at a time (``batched = False``) because r_ℓ may differ between layers.
    Defaults: r = 16, alpha = r (s = 1), lr 5e-4 (the paper's is not available: CLIP-SVD's, the same
    parametrization), weight decay 0 (σ is real weight mass: decay would shrink W).
    """

    energy: float | None = None

    name = "svfit"
    lr = 5e-4
    basis = "weight SVD, top-r (or an energy share)"
    trains = "σ (top-r singular values)"
    params = "r"
    export_rank = "r"
    paper = "https://arxiv.org/abs/2409.05926"
    batched = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.energy is not None:
            check_number(self, "energy (the kept share of Σσ², or None for r = rank)", self.energy, low=0, high=1,
                         low_open=True)  # fmt: skip

    def initialize(self, weights, names, calibration=None) -> Init:
        seeds = [layer_seed(self.seed, name) for name in names]
        U, S, Vh = truncated_svd(weights, self.rank, "top", self.svd, seeds, self.niter, self.oversample, self.dtype)
        if self.energy is not None:
            if weights.shape[0] != 1:
                raise ValueError("SVFit(energy=...) initializes one matrix at a time (its r depends on the layer).")
            total = torch.linalg.matrix_norm(weights[0].double()).square()  # ‖W‖_F² = Σ over all k of σᵢ²
            r = energy_rank(S[0], self.energy, power=2, total=total)  # S: the top `rank` of k values
            U, S, Vh = U[..., :r].contiguous(), S[..., :r].contiguous(), Vh[..., :r, :].contiguous()
        return spectral_init(U, S, Vh)

    core_type = Delta


@register
@dataclass(frozen=True)
class CLIPSVD(AdapterConfig):
    """CLIP-SVD (https://arxiv.org/abs/2509.03740): train all singular values of each weight.

    W' = W + s·U diag(σ − σ₀) Vᵀ over the full exact SVD (k = min(m, n)); equal to the official code's
    W' = U diag(σ) Vᵀ, kept as W plus a zero-at-init update so that the base is never rewritten.
    ``rank`` is ignored, in the scaling too (s = alpha; alpha=None: s = 1). k trainable
    values per matrix; rank(ΔW) can reach k, so export_peft refuses: merge and ship dense weights.
    Official defaults (ViT-B/16): lr 5e-4, weight decay 0.01 (AdamW decays σ itself, as the code does).
    """

    name = "clip-svd"
    lr = 5e-4
    weight_decay = 0.01
    basis = "weight SVD, full (all k)"
    trains = "σ (all singular values)"
    params = "min(m, n)"
    export_rank = "min(m, n): merged weights"
    paper = "https://arxiv.org/abs/2509.03740"
    exports_lora = False
    uses_rank = False

    def initialize(self, weights, names, calibration=None) -> Init:
        return spectral_init(*full_spectrum(self, weights))

    core_type = Delta


@register
@dataclass(frozen=True)
class VectorFit(AdapterConfig):
    """VectorFit (https://arxiv.org/abs/2503.19530): train the singular-value and bias vectors, with AVF.

    W' = W + s·U diag(σ − σ₀) Vᵀ (full exact SVD, k = min(m, n)),  b' = b + Δb (Δb = 0 at init, trained
    only where the layer has a bias). k (+ m with a bias) trainable values per matrix; ``rank`` is ignored
    (s = alpha; alpha=None: s = 1); full-rank update: merge to export.

    Adaptive Vector Freezing (the paper names it but gives no public formula; this is our rule): the
    vectors are every adapted layer's σ and Δb. After optimizer step t with t % avf_interval == 0, each
    vector's training strength is its mean absolute change from init, mean|σ − σ₀| or mean|Δb| (a mean,
    so that σ (length k) and Δb (length m) compare on one scale); the ⌈avf_fraction·N⌉ strongest of the
    N vectors (at most N − 1; ties: earlier layer name, σ before Δb) are frozen for the next avf_interval
    steps and every other vector is unfrozen. Before the first boundary nothing is frozen. Ranking is
    over the layers that share one config (the whole model unless ``overrides`` split it).
    Freezing drops the vector's gradient after clipping (``after_clipping`` sets ``.grad = None``, so
    AdamW skips it: no update, no decay, moments kept) instead of toggling ``requires_grad``, which would
    break DistributedDataParallel; the frozen set is a bool per adapter parameter in the layer's
    ``method_state`` (read it with ``avf_frozen(layer)``), saved by checkpoints so that a resumed run
    freezes exactly what the uninterrupted one would. The rule is a deterministic function of the
    parameters (identical on every rank). ``avf_fraction=0`` disables AVF.
    Defaults (our choices; the paper's values are not available): avf_interval 10, avf_fraction 0.1,
    lr 5e-4 (CLIP-SVD's, the same parametrization), weight decay 0 (σ is real weight mass).
    """

    avf_interval: int = 10
    avf_fraction: float = 0.1

    name = "vectorfit"
    lr = 5e-4
    basis = "weight SVD, full (all k)"
    trains = "σ (all singular values), Δb; adaptive vector freezing"
    params = "min(m, n) + m (Δb, where the layer has a bias)"
    export_rank = "min(m, n): merged weights"
    paper = "https://arxiv.org/abs/2503.19530"
    exports_lora = False
    uses_rank = False

    def __post_init__(self) -> None:
        super().__post_init__()
        interval = self.avf_interval
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"{type(self).__name__}: avf_interval must be a positive integer (steps), "
                             f"got {interval!r}.")
        what = "avf_fraction (the share of vectors frozen; 0 disables AVF)"
        check_number(self, what, self.avf_fraction, low=0, high=1, high_open=True)

    def initialize(self, weights, names, calibration=None) -> Init:
        return spectral_init(*full_spectrum(self, weights), bias=True)

    core_type = Delta

    def after_step(self, layers: dict, step: int, total_steps: int) -> None:
        if self.avf_fraction == 0 or step % self.avf_interval:
            return
        vectors = [(name, pname, strength) for name in sorted(layers)
                   for pname, strength in training_strengths(layers[name])]  # fmt: skip
        device = vectors[0][2].device if vectors else None
        strengths = torch.stack([s.float().to(device) for _, _, s in vectors]).tolist() if vectors else []  # one sync
        chosen = choose_frozen(strengths, self.avf_fraction)
        frozen: dict[str, set] = {name: set() for name in layers}
        for i in chosen:
            frozen[vectors[i][0]].add(vectors[i][1])
        for name, layer in layers.items():
            mask = [pname in frozen[name] for pname, _ in layer.adapter_parameters()]
            layer.method_state.set(AVF_FROZEN, torch.tensor(mask, dtype=torch.bool))

    def after_clipping(self, layers: dict, peak_lr: float) -> None:
        for layer in layers.values():
            frozen = avf_frozen(layer)
            for pname, p in layer.adapter_parameters():
                if pname in frozen:
                    p.grad = None
