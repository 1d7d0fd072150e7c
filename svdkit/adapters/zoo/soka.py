"""SoKA: train the leading terms of the weight's Kronecker-product SVD (KPSVD).

Chong & Qu 2025, https://arxiv.org/abs/2506.15251, METHODS.md §18. For W (m × n) with m = m1·m2 and
n = n1·n2, the Van Loan–Pitsianis rearrangement ℛ(W) (m1·n1 × m2·n2) has row (i1, j1) = vec of the
block W[i1-th block row, j1-th block column] (m2 × n2), so that ℛ(U ⊗ V) = vec(U) vec(V)ᵀ and

    ℛ(W) = Σ_k σ_k u_k v_kᵀ  (SVD)   ⇔   W = Σ_k σ_k U_k ⊗ V_k,   U_k = u_k as m1×n1, V_k = v_k as m2×n2.

Everything here is pure tensor algebra on row-major reshapes; the method config is at the bottom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Core
from svdkit.adapters.layers import Init
from svdkit.core.linalg import svd_exact


# -- Kronecker-product SVD ----------------------------------------------------------------------------
def closest_divisor(k: int) -> int:
    """The divisor of k closest to √k (the smaller one on a tie): 576 → 24, 1536 → 32, 96 → 8."""
    root = math.sqrt(k)
    return min((d for d in range(1, k + 1) if k % d == 0), key=lambda d: (abs(d - root), d))


def rearrange(W: Tensor, m1: int, n1: int) -> Tensor:
    """ℛ(W): (..., m1·m2, n1·n2) → (..., m1·n1, m2·n2), row i1·n1 + j1 = the flattened block (i1, j1)."""
    *lead, m, n = W.shape
    m2, n2 = m // m1, n // n1
    blocks = W.reshape(*lead, m1, m2, n1, n2).transpose(-3, -2)  # (..., m1, n1, m2, n2)
    return blocks.reshape(*lead, m1 * n1, m2 * n2)


def unrearrange(M: Tensor, m1: int, n1: int, m2: int, n2: int) -> Tensor:
    """Inverse of :func:`rearrange`: (..., m1·n1, m2·n2) → (..., m1·m2, n1·n2)."""
    *lead, _, _ = M.shape
    return M.reshape(*lead, m1, n1, m2, n2).transpose(-3, -2).reshape(*lead, m1 * m2, n1 * n2)


def kron_rearranged(sigma: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """ℛ(Σ_k σ_k U_k ⊗ V_k) = Σ_k σ_k vec(U_k) vec(V_k)ᵀ: one (m1n1 × R)·(R × m2n2) product."""
    R = U.shape[0]
    return (U.reshape(R, -1) * sigma[:, None]).T @ V.reshape(R, -1)


def kron_sum(sigma: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """Σ_k σ_k U_k ⊗ V_k for σ (R,), U (R, m1, n1), V (R, m2, n2), as a dense (m1·m2 × n1·n2) matrix."""
    return unrearrange(kron_rearranged(sigma, U, V), *U.shape[1:], *V.shape[1:])


def kpsvd(W: Tensor, m1: int, n1: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Full Kronecker-product SVD of one (m × n) matrix: σ (K,), U (K, m1, n1), V (K, m2, n2), σ descending.

    K = min(m1·n1, m2·n2); W = Σ_k σ_k U_k ⊗ V_k exactly, with the engine's sign convention on ℛ(W).
    """
    m, n = W.shape
    m2, n2 = m // m1, n // n1
    M = rearrange(W.to(dtype), m1, n1)
    u, S, vh = svd_exact(M, min(M.shape), "top", dtype)
    return S, u.T.reshape(-1, m1, n1), vh.reshape(-1, m2, n2)


# -- the rank rule --------------------------------------------------------------------------------------
def cumulative_energy(S: Tensor) -> Tensor:
    """E(k) = Σ_{i≤k} σ_i² / Σ_i σ_i², k = 1..K (fp64)."""
    e = S.double() ** 2
    return e.cumsum(0) / e.sum()


def energy_rank(S: Tensor, threshold: float) -> int:
    """The smallest k with E(k) ≥ threshold."""
    E = cumulative_energy(S)
    return min(int((E < threshold - 1e-12).sum()) + 1, S.numel())


def elbow_rank(S: Tensor) -> int:
    """The elbow (knee) of the cumulative-energy curve: the largest k maximizing E(k) − k/K.

    E rises above its chord from (0, 0) to (K, 1) while σ_k² exceeds the mean σ², so this keeps the
    terms of above-average energy; a flat spectrum has no elbow and gives K.
    """
    K = S.numel()
    gain = cumulative_energy(S) - torch.arange(1, K + 1, dtype=torch.float64) / K
    best = gain.max()
    return int(torch.nonzero(gain >= best - 1e-12).max()) + 1


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
