"""The registered low-rank-gradient optimizers (kind="optim"): one config class each, all built on
:class:`svdkit.optim.engine.GaLoreAdamW` and differing only in their defaults.

``svdkit.optim.build(model_or_params, svdkit.config("q-galore", rank=64), lr=1e-3)`` returns the optimizer.
Every field is a :class:`GaLoreAdamW` option; see :mod:`svdkit.optim.engine` for the update and the choices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from svdkit.core.registry import config_to_dict, register
from svdkit.optim.engine import GaLoreAdamW, _check_group


@dataclass(frozen=True)
class LowRankGradient:
    """Fields shared by the GaLore family (the options of :class:`svdkit.optim.engine.GaLoreAdamW`).

    ``on_switch`` defaults to "reset", from BENCHMARKS.md's measurement (``benchmarks/pretrain.py --spike``,
    bench tier, 2 seeds each): the mean train-loss jump at the refreshes could not separate the three rules
    (within 0.006 nats, below the step-to-step noise), and held-out perplexity ordered reset (310) < keep (336)
    < rotate (365), seed spreads ≤ 28. ``on_switch="keep"`` stays available: it is galore-torch's behaviour (the
    reference) and the one DESIGN.md §8's example passes.
    """

    kind: ClassVar[str] = "optim"
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    default_lr: ClassVar[float] = 1e-2  # GaLore's pre-training recipe: lr 0.01 with scale 0.25 (App. C.1)
    parametrizes: ClassVar[bool] = False

    rank: int = 128
    update_gap: int = 200
    scale: float = 0.25
    projection: str = "svd"
    on_switch: str = "reset"
    niter: int = 2
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 0
    pca_lr_ratio: float = 5.0
    ortho: float = 0.1
    lazy_threshold: float | None = None
    lazy_queue: int = 5
    proj_bits: int | None = None
    weight_bits: int | None = None
    quant_group: int = 256
    share_heads: bool = False  # GaLore+: one projector per attention matrix, from its strongest head
    residual_density: float = 0.0  # GaLore+: fraction of each matrix's entries in the sparse residual (0: off)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(self.betas))
        _check_group({**self.options(), "betas": self.betas})

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def options(self) -> dict:
        """Keyword options for :class:`GaLoreAdamW` (``share_heads`` becomes per-group ``heads`` in build)."""
        out = {k: v for k, v in config_to_dict(self).items() if not k.startswith("_") and k != "share_heads"}
        return {**out, "betas": tuple(self.betas)}

    def make(self, groups: list, lr: float):
        return GaLoreAdamW(groups, lr=lr, **self.options())


@register
@dataclass(frozen=True)
class GaLore(LowRankGradient):
    """GaLore (https://arxiv.org/abs/2403.03507): Adam in the span of the gradient's top-r singular vectors,
    refreshed every ``update_gap`` steps; ``projection`` picks the basis ("svd", "randomized", "dct",
    "online-pca", "random")."""

    name = "galore"
    paper = "https://arxiv.org/abs/2403.03507"
    summary = "low-rank Adam moments in the gradient's top-r singular subspace, refreshed every T steps"


@register
@dataclass(frozen=True)
class GaLoreDCT(LowRankGradient):
    """SVD-free GaLore (Modoranu et al., https://arxiv.org/abs/2505.17967): the r DCT-II basis vectors best
    aligned with the gradient (ℓ1 of D G), only their indices stored. The paper re-selects every step
    (``update_gap=1``); the default here keeps GaLore's T = 200 so the two differ only in the basis."""

    name = "galore-dct"
    paper = "https://arxiv.org/abs/2505.17967"
    summary = "GaLore with a fixed DCT basis: top-r columns by alignment with the gradient (no SVD, indices only)"
    projection: str = "dct"


@register
@dataclass(frozen=True)
class OnlineSubspaceDescent(LowRankGradient):
    """Online Subspace Descent (https://arxiv.org/abs/2408.12857): no SVD after the first step; the projector
    takes one Adam step per iteration on ‖P Pᵀ g̃ − g̃‖² + λ‖PᵀP − I‖² (λ = ``ortho`` = 0.1, §5.3) with
    lr = ``pca_lr_ratio`` · η_t (α = 5, §5.3). Moments drift with P (the paper's rule)."""

    name = "osd"
    paper = "https://arxiv.org/abs/2408.12857"
    summary = "projector follows the gradient by one online-PCA Adam step per iteration (no periodic SVD)"
    projection: str = "online-pca"
    on_switch: str = "keep"


@register
@dataclass(frozen=True)
class QGaLore(LowRankGradient):
    """Q-GaLore (https://arxiv.org/abs/2407.08296): layer-adaptive lazy refresh (a layer's gap doubles once 5
    successive refreshes had |cos| ≥ 0.4 between first basis vectors), INT4 projectors and INT8 weights with
    stochastic rounding, block size 256 (the paper's defaults), fake-quantized: the dynamics are the
    quantized optimizer's, the memory saving is reported by ``svdkit.optim.memory_report``. Adam states stay
    fp32 (the paper's 8-bit Adam is bitsandbytes/CUDA-only)."""

    name = "q-galore"
    paper = "https://arxiv.org/abs/2407.08296"
    summary = "GaLore with lazy layer-wise refresh, INT4 projectors and INT8 stochastic-rounded weights"
    lazy_threshold: float | None = 0.4
    proj_bits: int | None = 4
    weight_bits: int | None = 8


@register
@dataclass(frozen=True)
class GaLorePlus(LowRankGradient):
    """GaLore+ (https://arxiv.org/abs/2412.19820): randomized subspace iteration (svdkit's seeded engine,
    ``niter`` = 2) instead of a full SVD, and for attention q/k/v one input-side projector per matrix
    computed from its strongest head's rows and shared by all heads; and the sparsely coded residual
    (``residual_density``, on by default as in the paper; 0 turns it off).

    The residual as implemented (equations in :mod:`svdkit.optim.engine`): the part of each gradient the
    projection drops, E = X − P Pᵀ X, keeps its own Adam moments on a sparse support Ω — the ⌈density·s·L⌉
    entries with the largest |E| at the last refresh — and scale · m̂_e / (√v̂_e + ε) is added to the
    low-rank update on Ω. Source note: the paper's abstract says sparsely coded residuals reduce the
    low-rank error of the first- and second-order moments and of the weight update, and its ablation varies
    the proportion of non-zero entries of a "sparse indexing matrix"; the section with the exact equations
    and the density of its main tables could not be read with the tools available to us. The formulation
    above is ours, consistent with that description; ``residual_density`` = 0.01 (1 % of the entries, 16
    bytes each: an int64 index and two fp32 moments) is our choice, not a number from the paper."""

    name = "galore-plus"
    paper = "https://arxiv.org/abs/2412.19820"
    summary = "GaLore with randomized subspace iteration, a cross-head shared projector and a sparse moment residual"
    projection: str = "randomized"
    share_heads: bool = True
    residual_density: float = 0.01
