"""SVFT: a sparse, gated update in the weight's own singular basis (METHODS.md §6).

W' = U(Σ + σ(g)·M)Vᵀ = W + s·U (σ(g)·M) Vᵀ. The layer keeps W untouched and adds the update with
frozen B = U (m×k) and A = Vᵀ (k×n) of the full thin exact SVD (k = min(m, n)); the core returns the
dense k×k matrix σ(g)·M from p trainable values at fixed (row, col) positions.
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
from svdkit.core.linalg import layer_seed, svd_exact

PATTERNS = ("plain", "banded", "random", "top-k")
INITS = ("zero", "kaiming")
DEFAULT_BANDS = 16  # the paper's d for its banded/random Gemma-2B runs (lr 5e-3 there)


class SparseCore(Core):
    """C = σ(g)·M, M (k×k) zero except ``values`` at (``rows``, ``cols``); repeated positions add up.

    With ``sigma`` (Σ/s, frozen; SVFT with fold=True) C = diag(sigma) + σ(g)·M and ``base()`` = diag(sigma):
    the layer then drops W, since s·U diag(Σ/s) Vᵀ = W.
    """

    def __init__(self, values: Tensor, gate: Tensor, rows: Tensor, cols: Tensor, size: Tensor,
                 sigma: Tensor | None = None):  # fmt: skip
        super().__init__()
        self.values = nn.Parameter(values.detach().clone())
        self.gate = nn.Parameter(gate.detach().clone())
        self.register_buffer("rows", rows.detach().clone().long())
        self.register_buffer("cols", cols.detach().clone().long())
        self.register_buffer("size", size.detach().clone().long())
        self.k = int(size)  # a Python int: no device sync in forward
        if sigma is not None:
            self.register_buffer("sigma", sigma.detach().clone())
        else:
            self.sigma = None

    def forward(self) -> Tensor:
        dense = self.values.new_zeros(self.k, self.k) if self.sigma is None else torch.diag(self.sigma)
        return dense.index_put((self.rows, self.cols), torch.sigmoid(self.gate) * self.values, accumulate=True)

    def base(self) -> Tensor:
        """The part of C that stands for W (fold=True only)."""
        return torch.diag(self.sigma)

    def extra_repr(self) -> str:
        return f"k={self.k}, entries={self.values.numel()}, gated"


def effective_bands(d: int, k: int) -> int:
    """d capped at k − 1 (the band then covers all of M)."""
    return min(d, k - 1)


def band_count(k: int, d: int) -> int:
    """Entries with |i − j| ≤ d in a k×k matrix: k(2d+1) − d(d+1), with d capped at k − 1."""
    d = effective_bands(d, k)
    return k * (2 * d + 1) - d * (d + 1)


def band_positions(k: int, d: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) of |i − j| ≤ d, row-major."""
    d = effective_bands(d, k)
    i = torch.arange(k).unsqueeze(1).expand(k, 2 * d + 1)
    j = i + torch.arange(-d, d + 1).unsqueeze(0)
    keep = (j >= 0) & (j < k)
    return i[keep], j[keep]


def alignment(U: Tensor, Vh: Tensor) -> Tensor:
    """The paper's top-k score u_iᵀ v_j for all (i, j), as a k×k matrix.

    Defined by the paper for square W only; for m ≠ n the vectors are compared on their first k = min(m, n)
    coordinates (the shorter vector zero-padded), which is the paper's formula when m = n.
    """
    k = U.shape[-1]
    return U[:k].T @ Vh[:, :k].T


def _flat_positions(flat: Tensor, k: int) -> tuple[Tensor, Tensor]:
    flat = flat.sort().values  # row-major
    return flat // k, flat % k


class _Pattern:
    """Chooses the positions of one layer's trainable entries."""

    def __init__(self, cfg: "SVFT", k: int):
        self.cfg, self.k = cfg, k

    def count(self) -> int:
        cfg, k = self.cfg, self.k
        if cfg.pattern == "plain":
            return k
        if cfg.num_entries is not None:
            return min(cfg.num_entries, k * k)
        return band_count(k, cfg.bands_or_default)

    def positions(self, U: Tensor, Vh: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        cfg, k, p = self.cfg, self.k, self.count()
        if cfg.pattern == "plain":
            return torch.arange(k), torch.arange(k)
        if cfg.pattern == "banded":
            return band_positions(k, cfg.bands_or_default)
        if cfg.pattern == "random":  # p distinct positions (the paper; the code samples with replacement)
            return _flat_positions(torch.randperm(k * k, generator=gen)[:p], k)
        scores = alignment(U, Vh).flatten().cpu()
        return _flat_positions(torch.sort(scores, descending=True, stable=True).indices[:p], k)


@register
@dataclass(frozen=True)
class SVFT(AdapterConfig):
    """SVFT (https://arxiv.org/abs/2405.19597): W' = U(Σ + σ(g)·M)Vᵀ, M sparse in the singular basis.

    ΔW = s·U (σ(g)·M) Vᵀ with the full thin exact SVD (k = min(m, n)), frozen U, V, and p trainable entries
    of M plus one gate g per layer (init 0: σ(g) = ½). s = α/r is 1 by default (the paper has no scaling;
    ``rank`` is otherwise ignored; ``svd``/``niter``/``oversample`` too: the SVD is always exact and full).

    pattern:     ``"plain"`` (diagonal, p = k), ``"banded"`` (|i−j| ≤ d, p = k(2d+1) − d(d+1)),
                 ``"random"`` (p distinct positions seeded by ``layer_seed(seed, name)``: the paper
                 "randomly selects" entries; the official code samples with replacement, so its p may
                 contain duplicates), ``"top-k"`` (the p largest u_iᵀ v_j, the paper's signed score in
                 svdkit's sign convention, i.e. (UᵀV)_ij; for m ≠ n compared on the first min(m, n) coordinates.
                 The official code scores (U·V)_ij instead, and raw entries of the square factor for m ≠ n).
    bands:       d for banded (default 16); for random/top-k it sets p to the banded count (the code's
                 rule), unless ``num_entries`` gives p. d is capped at k − 1 and p at k².
    init:        ``"zero"`` (default: M = 0, so the init preserves the function) or ``"kaiming"`` (the
                 official code: values ~ N(0, 2/p), drawn in fp32 from the layer's generator after any
                 random positions; the model then changes by s·½·U M₀ Vᵀ at step 0).
    Positions are stored row-major with the adapter (never recomputed at load).
    Defaults: lr 5e-2 (plain; the paper uses 5e-3 for banded d = 16), weight decay 0.

    Memory: by default the layer holds W (untouched) plus U (m×k) and Vᵀ (k×n): (m+n)k/(mn) =
    (m+n)/max(m, n) extra times the weight (×2 in bytes for a bf16 base, factors being fp32). SmolLM2-135M:
    2.0 for 576×576, 1.33 for 192×576, 1.375 for 1536×576 and 576×1536; 1.49 over all its adapted weights.
    ``fold=True`` computes the function from U, Σ, V alone, y = b + s·U(Σ/s + σ(g)M)Vᵀx, and drops W
    (freed unless something else references it): memory (m+n)k instead of mn + (m+n)k; ``unadapt``
    then restores W = UΣVᵀ up to rounding (as for every ``fold``).
    """

    pattern: str = "plain"
    bands: int | None = None
    num_entries: int | None = None
    init: str = "zero"

    name = "svft"
    lr = 5e-2
    weight_decay = 0.0
    uses_rank = False
    exports_lora = False
    basis = "weight SVD, full (k = min(m, n))"
    trains = "sparse M (k×k) in the singular basis + gate"
    params = "k+1 plain; k(2d+1)−d(d+1)+1 banded; p+1 random/top-k (k = min(m,n))"
    export_rank = "up to k (merge)"
    paper = "https://arxiv.org/abs/2405.19597"

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        if self.pattern not in PATTERNS:
            raise ValueError(f"{cls}: pattern must be one of {', '.join(map(repr, PATTERNS))}, got {self.pattern!r}.")
        if self.init not in INITS:
            raise ValueError(f"{cls}: init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}.")
        for field_name, low in (("bands", 0), ("num_entries", 1)):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{cls}: {field_name} must be None or an integer >= {low}, got {value!r}.")
        if self.pattern == "plain" and self.bands not in (None, 0):
            raise ValueError(
                f"{cls}: pattern 'plain' is the diagonal (bands = 0); use pattern='banded' for bands={self.bands}."
            )
        if self.num_entries is not None and self.pattern not in ("random", "top-k"):
            raise ValueError(f"{cls}: num_entries applies to the 'random' and 'top-k' patterns, not {self.pattern!r}.")
        if self.num_entries is not None and self.bands is not None:
            raise ValueError(f"{cls}: give bands (p = the banded count) or num_entries (p), not both.")

    @property
    def bands_or_default(self) -> int:
        return DEFAULT_BANDS if self.bands is None else self.bands

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        k = min(m, n)
        U, S, Vh = svd_exact(weights, k, "top", self.dtype)
        pattern = _Pattern(self, k)
        p = pattern.count()
        kaiming = self.init == "kaiming"
        rows, cols, values = [], [], []
        for i, name in enumerate(names):
            gen = torch.Generator().manual_seed(layer_seed(self.seed, name))
            r, c = pattern.positions(U[i], Vh[i], gen)
            rows.append(r)
            cols.append(c)
            values.append(torch.randn(p, generator=gen) * math.sqrt(2.0 / p) if kaiming else torch.zeros(p))
        dev, dt = weights.device, self.dtype
        core = dict(
            values=torch.stack(values).to(dev, dt), gate=torch.zeros(b, 1, device=dev, dtype=dt),
            rows=torch.stack(rows).to(dev), cols=torch.stack(cols).to(dev), size=torch.full((b,), k, device=dev),
        )  # fmt: skip
        if self.fold:  # the factors stand for W: the layer drops it (memory (m+n)k instead of mn + (m+n)k)
            core["sigma"] = S / self.scaling
        return Init(A=Vh, B=U, trainable=frozenset(), subtract=False, core=core, weightless=self.fold)

    core_type = SparseCore
