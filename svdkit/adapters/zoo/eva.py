"""EVA, Explained Variance Adaptation (https://arxiv.org/abs/2410.07170; METHODS.md §11).

A_l = the top-r_l′ principal components of layer l's inputs (incremental PCA over calibration batches,
:mod:`svdkit.core.ipca`), B_l = 0, the base untouched. The ranks r_l′ come from pooling every layer's
explained-variance ratios and keeping the global top Σ_l r_l; α_l = α·r_l′/r_l keeps s = α/r.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from svdkit.core.calibration import Statistic
from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.core.ipca import SVD_METHODS, explained_variance_ratio, ipca_converged, ipca_start, ipca_update
from svdkit.adapters.layers import Init

TOKENS = ("labels", "attention")


def _check_tau(owner: str, tau) -> None:
    if not (isinstance(tau, (int, float)) and 0.0 <= tau <= 1.0):
        raise ValueError(f"{owner}: tau (the cosine threshold of convergence) must be in [0, 1], got {tau!r}.")


@dataclass(frozen=True)
class ActivationPCA(Statistic):
    """The top-c principal components of a module's inputs, by EVA's incremental PCA (:mod:`svdkit.core.ipca`).

    components: c (capped at the input width n).  tau: a module stops updating once every component's
    |cos| with its value before the last batch is ≥ τ (EVA: 0.99).  tokens: ``"labels"`` (positions whose
    label is not -100; PEFT ``use_label_mask=True``) or ``"attention"`` (every non-padding token).
    svd / niter / seed: exact SVD, or seeded randomized SVD with q = 2c sketch columns and ``niter`` power
    iterations (EVA: ``svd_lowrank``, q = 2c, 4 iterations). Every selected row counts (EVA's code skips
    batches of fewer than c rows; a module that saw fewer than c rows in all has fewer non-zero components,
    which caps its rank). Rows are gathered over ranks under DDP (the update is sequential).
    Result: {"components": (c × n), "explained_variance_ratio": (c,), "singular_values": (c,)}, fp32.
    """

    components: int = 32
    tau: float = 0.99
    tokens: str = "labels"
    svd: str = "randomized"
    niter: int = 4
    seed: int = 0

    kind = "activation_pca"
    reduce = "gather"

    def __post_init__(self) -> None:
        if not isinstance(self.components, int) or isinstance(self.components, bool) or self.components <= 0:
            raise ValueError(f"ActivationPCA: components must be a positive integer, got {self.components!r}.")
        _check_tau("ActivationPCA", self.tau)
        if self.tokens not in TOKENS:
            raise ValueError(f"ActivationPCA: tokens must be one of {TOKENS}, got {self.tokens!r}.")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"ActivationPCA: svd must be one of {SVD_METHODS}, got {self.svd!r}.")

    def start(self, n_in, m_out, device):
        return ipca_start(n_in, self.components, device)

    def update(self, state, x, counts):
        ipca_update(state, x, self.svd, self.niter, self.seed)

    def converged(self, state):
        return ipca_converged(state, self.tau)

    def finish(self, state):
        c = state["components"].shape[0]
        if not self.converged(state):
            warnings.warn(
                f"EVA's incremental PCA did not converge (|cos| ≥ {self.tau} between the last two updates for all "
                f"{c} components) within the calibration batches; pass more batches for stable components.",
                stacklevel=2,
            )
        out = {"explained_variance_ratio": explained_variance_ratio(state)}
        out.update(components=state["components"], singular_values=state["singular_values"])
        return {k: v.float().cpu() for k, v in out.items()}


def redistribute_ranks(ratios: Mapping[str, Tensor], budget: int, caps: Mapping[str, int]) -> dict[str, int]:
    """EVA's rank redistribution: r_l′ = how many of layer l's ratios are among the global top ``budget``.

    Only the first ``caps[l]`` ratios of each layer compete (a layer cannot take more components than it
    has, nor a rank ≥ min(m, n)), and only positive ones (a zero ratio is a component never measured).
    Ties are broken by the order of ``ratios`` (earlier layer first), then by component index, so r_l′ is
    deterministic and layers measured once for a shared input (q/k/v) differ by at most one.
    Returns every layer's r_l′ (0: the layer is dropped).
    """
    pool = [(-float(v), order, i, name) for order, (name, vals) in enumerate(ratios.items())
            for i, v in enumerate(vals[: max(0, caps[name])].tolist()) if v > 0]  # fmt: skip
    pool.sort()
    ranks = dict.fromkeys(ratios, 0)
    for *_, name in pool[:budget]:
        ranks[name] += 1
    return ranks


@register
@dataclass(frozen=True)
class EVA(AdapterConfig):
    """EVA (https://arxiv.org/abs/2410.07170): LoRA whose A is the top principal components of the layer inputs.

    A_l = V_l[:r_l′] (rows: principal directions of the inputs x, label-masked tokens), optionally whitened
    A_l = diag(σ)^{-1/2} V_l[:r_l′]; B_l = 0, so the base is untouched and the init function-preserving.
    r_l′ = layer l's share of the global top Σ_l r_l explained-variance ratios among c = round(ρ·r) per layer
    (capped below min(m, n)); layers with r_l′ = 0 are excluded; α_l = α·r_l′/r_l (α·√(r_l′/r_l) with rsLoRA)
    keeps s constant. Trains Σ_l r_l′(m_l + n_l) parameters (Σ_l r_l′ = Σ_l r_l unless a layer is capped).
    Defaults: r = 16, α = 1 (EVA repo; PEFT's default lora_alpha is 8), ρ = 2, τ = 0.99, label mask on,
    randomized SVD (q = 2c, 4 iterations) as the code; lr 5e-4 (paper).
    Paper vs code: components are compared by |cos| (the code: signed cosine with sign-fixed components), and
    a layer stops when all c components are stable (the code: its currently allotted top r_l′, re-checked
    every batch); the PCA only sees the batches given to svdkit.calibrate (the code cycles the data until
    convergence), with a warning when that is not enough. ``label_mask=False`` measures every non-padding token.
    """

    alpha: float | None = 1.0
    svd: str = "randomized"
    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False
    label_mask: bool = True

    name = "eva"
    lr = 5e-4
    basis = "PCA of calibration layer inputs (incremental)"
    trains = "B, A"
    params = "r_l′(m+n), Σ r_l′ = Σ r_l"
    export_rank = "r_l′ (per layer)"
    paper = "https://arxiv.org/abs/2410.07170"
    uses_calibration = True
    batched = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.rho, (int, float)) and self.rho >= 1.0):
            raise ValueError(f"EVA: rho (c = round(rho·rank) components per layer) must be >= 1, got {self.rho!r}.")
        _check_tau("EVA", self.tau)
        for option in ("whiten", "label_mask"):
            if not isinstance(getattr(self, option), bool):
                raise ValueError(f"EVA: {option} must be True or False, got {getattr(self, option)!r}.")

    def statistic(self) -> ActivationPCA:
        """c = round(ρ·r) components per layer (from the config's ``rank``; per-module overrides do not change c)."""
        return ActivationPCA(components=round(self.rank * self.rho), tau=self.tau,
                             tokens="labels" if self.label_mask else "attention",
                             svd=self.svd, niter=self.niter, seed=self.seed)  # fmt: skip

    def resolve(self, calibration, shapes: dict[str, tuple[int, int]]) -> "EVA":
        """This config with the redistributed ranks as exact-name ``overrides`` (rank r_l′, alpha α_l) and the
        layers of rank 0 added to ``exclude``. Resolving a resolved config changes nothing."""
        ratios = {name: calibration[name]["explained_variance_ratio"] for name in shapes}
        caps = {name: min(len(ratios[name]), min(shape) - 1) for name, shape in shapes.items()}
        budget = sum(self.for_module(name).rank for name in shapes)
        overrides, dropped = dict(self.overrides), []
        for name, r_new in redistribute_ranks(ratios, budget, caps).items():
            mcfg = self.for_module(name)
            if r_new == 0:
                dropped.append(re.escape(name))
            elif r_new != mcfg.rank:
                factor = r_new / mcfg.rank
                alpha = mcfg.rank if mcfg.alpha is None else mcfg.alpha
                overrides[f"^{re.escape(name)}$"] = {"rank": r_new,
                                                     "alpha": alpha * (math.sqrt(factor) if self.use_rslora else factor)}
        exclude = self.exclude
        if dropped:
            exclude = "|".join(([f"(?:{exclude})"] if exclude else []) + [f"^(?:{'|'.join(dropped)})$"])
        return dataclasses.replace(self, overrides=overrides, exclude=exclude)

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        A = torch.stack([self._components(name, n, calibration) for name in names])
        return Init(A=A.to(weights.device), B=torch.zeros(b, m, self.rank, dtype=self.dtype, device=weights.device),
                    subtract=False)  # fmt: skip

    def _components(self, name: str, n: int, calibration) -> Tensor:
        """A for one layer: its top-r principal components (r × n), whitened by σ^{-1/2} if asked."""
        t = calibration[name]
        V, S = t["components"], t["singular_values"]
        measured = int((S > 0).sum())
        if V.shape[-1] != n or measured < self.rank:
            raise ValueError(
                f"EVA: the calibration of {name} holds {measured} measured components of width {V.shape[-1]}, but the "
                f"layer needs {self.rank} of width {n}: recompute it with svdkit.calibrate(model, batches, cfg) for "
                "this config (with more calibration tokens if too few were seen)."
            )
        A = V[: self.rank].to(self.dtype)
        if self.whiten:
            A = A / S[: self.rank].to(self.dtype).sqrt()[:, None]  # σ > 0: checked above
        return A
