"""SoKA: train the leading terms of the weight's Kronecker-product SVD (KPSVD).

Chong & Qu 2025, https://arxiv.org/abs/2506.15251, METHODS.md §18. For W (m × n) with m = m1·m2 and
n = n1·n2, the Van Loan–Pitsianis rearrangement ℛ(W) (m1·n1 × m2·n2) has row (i1, j1) = vec of the
block W[i1-th block row, j1-th block column] (m2 × n2), so that ℛ(U ⊗ V) = vec(U) vec(V)ᵀ and

    ℛ(W) = Σ_k σ_k u_k v_kᵀ  (SVD)   ⇔   W = Σ_k σ_k U_k ⊗ V_k,   U_k = u_k as m1×n1, V_k = v_k as m2×n2.

The decomposition is :func:`svdkit.core.linalg_structured.kpsvd` (pure tensor algebra on row-major reshapes),
the rank rule reads :mod:`svdkit.core.linalg_rank`; this file holds the rule, the core and the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Core
from svdkit.adapters.layers import Init
from svdkit.core.linalg_rank import elbow_rank, energy_rank
from svdkit.core.linalg_structured import closest_divisor, kpsvd, kron_rearranged, unrearrange


# -- the rank rule --------------------------------------------------------------------------------------
def kronecker_rank(S: Tensor, energy: float, elbow: bool, cap: int) -> int:
    """R = min(energy rank, elbow rank, cap), at least 1: a term is dropped if either criterion calls it negligible."""
    r = energy_rank(S, energy)
    if elbow:
        r = min(r, elbow_rank(S))
    return max(1, min(r, cap))


# -- the core -------------------------------------------------------------------------------------------
class KroneckerDelta(Core):
    """C = Σ_k σ_k U_k ⊗ V_k − Σ_k σ⁰_k U⁰_k ⊗ V⁰_k: trainable Kronecker terms measured from their init.

    The frozen starting terms are kept as factors (R(m1n1 + m2n2 + 1) numbers), not as a dense m×n copy;
    both sums go through the same ℛ-space product, so C is exactly zero at init.
    """

    def __init__(self, sigma: Tensor, u: Tensor, v: Tensor, sigma0: Tensor, u0: Tensor, v0: Tensor):
        super().__init__()
        for key, value in (("sigma", sigma), ("u", u), ("v", v)):
            setattr(self, key, nn.Parameter(value.detach().clone()))
        for key, value in (("sigma0", sigma0), ("u0", u0), ("v0", v0)):
            self.register_buffer(key, value.detach().clone())

    def forward(self) -> Tensor:
        delta = kron_rearranged(self.sigma, self.u, self.v) - kron_rearranged(self.sigma0, self.u0, self.v0)
        return unrearrange(delta, *self.u.shape[1:], *self.v.shape[1:])

    def extra_repr(self) -> str:
        R, m1, n1 = self.u.shape
        return f"{R} terms of ({m1}×{n1}) ⊗ ({self.v.shape[1]}×{self.v.shape[2]})"


_CORE_KEYS = ("sigma", "u", "v", "sigma0", "u0", "v0")


@register
@dataclass(frozen=True)
class SoKA(AdapterConfig):
    """SoKA (https://arxiv.org/abs/2506.15251): train the top-R terms of the Kronecker-product SVD of W.

    ℛ(W) = Σ σ_k u_k v_kᵀ  ⇒  W = Σ σ_k U_k ⊗ V_k;  W' = W + s·(Σ_{k≤R} τ_k U_k⊗V_k − its init), τ⁰ = σ/s,
    i.e. W' = W_res + Σ_{k≤R} s·τ_k U_k ⊗ V_k with W_res = W − Σ_{k≤R} σ_k U⁰_k ⊗ V⁰_k.
    Trains U_k, V_k and σ_k: R(m1·n1 + m2·n2 + 1) per matrix; the update is full-rank: merged export.

    Options: ``factors`` = (m1, n1), the shape of U_k, for every target (None: per dimension the divisor
    closest to √m and √n, the smaller on a tie: 576 → 24·24, 1536 → 32·48). ``energy`` (default 0.9)
    and ``elbow`` pick the per-layer rank R = min(r_E, r_elbow, rank), at least 1, with
    r_E = min{k : E(k) ≥ energy}, E(k) = Σ_{i≤k} σ_i²/Σ σ_i², and r_elbow = the knee of E (the largest
    k maximizing E(k) − k/K, K = min(m1n1, m2n2): the terms of above-average energy; K for a flat
    spectrum). ``rank`` is the cap on R. Layers get different ranks, so each is initialized alone.

    Choices where the paper is unspecified here [?]: (1) the exact way the energy threshold and the
    elbow combine (we drop a term if either criterion calls it negligible), and the default threshold;
    (2) the init: PiSSA-style — the top-R terms move from a frozen residual into the trainable terms,
    so the init is function-preserving (the alternative, adding the terms on top of W, doubles them);
    (3) σ_k trains together with the factors. The full spectrum of ℛ(W) is needed, so the SVD is
    always exact (``svd="randomized"`` is refused). The core materializes the dense m×n ΔW/s each
    forward (the shared layer takes dense cores); frozen initial terms are kept as factors, not as a
    dense copy. lr and weight decay: the library defaults (2e-4, 0).
    """

    factors: tuple[int, int] | None = None
    energy: float = 0.9
    elbow: bool = True

    name = "soka"
    basis = "Kronecker-product SVD (Van Loan rearrangement), top-R by energy + elbow"
    trains = "Kronecker factors U_k, V_k and σ_k"
    params = "R(m1·n1 + m2·n2 + 1), R per layer"
    export_rank = "full (merge)"
    paper = "https://arxiv.org/abs/2506.15251"
    exports_lora = False
    batched = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.factors, list):
            object.__setattr__(self, "factors", tuple(self.factors))
        if self.factors is not None and not (
            len(self.factors) == 2 and all(isinstance(f, int) and not isinstance(f, bool) and f > 0 for f in self.factors)
        ):
            raise ValueError(f"SoKA: factors must be None (automatic) or two positive integers (m1, n1), got {self.factors!r}.")
        if isinstance(self.energy, bool) or not isinstance(self.energy, (int, float)) or not 0 < self.energy <= 1:
            raise ValueError(f"SoKA: energy must be a cumulative-energy fraction in (0, 1], got {self.energy!r}.")
        if not isinstance(self.elbow, bool):
            raise ValueError(f"SoKA: elbow must be True or False, got {self.elbow!r}.")
        if self.svd != "exact":
            raise ValueError("SoKA: svd must be 'exact': the energy/elbow rank rule needs the full spectrum of ℛ(W).")

    def kron_shape(self, name: str, m: int, n: int) -> tuple[int, int, int, int]:
        """(m1, n1, m2, n2) for an m×n weight: ``factors`` or the divisors closest to √m, √n."""
        m1, n1 = self.factors if self.factors is not None else (closest_divisor(m), closest_divisor(n))
        if m % m1 or n % n1:
            raise ValueError(f"SoKA: factors=({m1}, {n1}) do not divide {name}'s {m}×{n} weight (out × in); "
                             "set factors=None (automatic) or exclude the module.")  # fmt: skip
        return m1, n1, m // m1, n // n1

    def initialize(self, weights, names, calibration=None) -> Init:
        terms = [self._terms(W, name) for W, name in zip(weights, names)]
        core = {key: torch.stack([t[i] for t in terms]) for i, key in enumerate(_CORE_KEYS)}
        return Init(A=None, B=None, trainable=frozenset(), subtract=False, core=core)

    def _terms(self, W: Tensor, name: str) -> tuple[Tensor, ...]:
        m1, n1, _, _ = self.kron_shape(name, *W.shape)
        S, U, V = kpsvd(W, m1, n1, self.dtype)
        R = kronecker_rank(S, self.energy, self.elbow, self.rank)
        sigma = S[:R] / self.scaling
        return sigma, U[:R], V[:R], sigma, U[:R], V[:R]

    core_type = KroneckerDelta
