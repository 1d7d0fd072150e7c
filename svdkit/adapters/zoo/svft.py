"""SVFT: a sparse, gated update in the weight's own singular basis (METHODS.md §6).

W' = U(Σ + σ(g)·M)Vᵀ = W + s·U (σ(g)·M) Vᵀ. The layer keeps W untouched and adds the update with
frozen B = U (m×k) and A = Vᵀ (k×n) of the full thin exact SVD (k = min(m, n)); the core holds p trainable
values at fixed (row, col) positions and gives the layer σ(g)·M as a vector (the plain pattern: the
diagonal) or as index/value pairs (gather/scatter on Vᵀx), never as a dense k×k matrix in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import Refused, register
from svdkit.adapters.cores import Core, Sparse, SparsePlan, dense_core, sparse_plan
from svdkit.adapters.layers import Init
from svdkit.core.linalg import layer_seed, truncated_svd

PATTERNS = ("plain", "banded", "random", "top-k")
INITS = ("zero", "kaiming")
DEFAULT_BANDS = 16  # the paper's d for its banded/random Gemma-2B runs (lr 5e-3 there)


class SparseCore(Core):
    """C = σ(g)·M, M (k×k) zero except ``values`` at (``rows``, ``cols``); repeated positions add up.

    With ``sigma`` (Σ/s, frozen; SVFT over the full SVD) C = diag(sigma) + σ(g)·M and ``base()`` = diag(sigma):
    the layer computes from the factors alone (s·U diag(Σ/s) Vᵀ = W), and drops W with fold=True.
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
        arange = torch.arange(self.k, device=self.rows.device)
        self.diagonal = bool(len(rows) == self.k and torch.equal(self.rows, arange) and torch.equal(self.cols, arange))
        if sigma is not None:
            self.register_buffer("sigma", sigma.detach().clone())
        else:
            self.sigma = None

    def forward(self) -> Tensor:
        """C as a dense k×k matrix (the dense views: merge, ΔW)."""
        c = self.structured()
        return torch.diag(c) if isinstance(c, Tensor) else dense_core(c)

    def structured(self) -> Tensor | Sparse:
        """The layer's form of C: a vector for the diagonal pattern (plain), else the index/value pairs
        (never a dense k×k matrix in the forward)."""
        values = torch.sigmoid(self.gate) * self.values
        if self.diagonal:
            return values if self.sigma is None else self.sigma + values
        return Sparse(self.rows, self.cols, values, self.k, self.sigma, self._plan())

    def _plan(self) -> SparsePlan:
        """The CSR index plan of the positions, made once per device (not a buffer: never saved)."""
        plan = getattr(self, "_csr_plan", None)
        if plan is None or plan.order.device != self.rows.device:
            plan = self._csr_plan = sparse_plan(self.rows, self.cols, self.k)
        return plan

    def base(self) -> Tensor:
        """The part of C that stands for W (diag(Σ/s))."""
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
    of M plus one gate g per layer (init 0: σ(g) = ½). s = α (1 by default: the paper has no scaling);
    ``rank`` is ignored and never enters s; ``svd``/``niter``/``oversample`` too: the SVD is always exact.

    pattern:     ``"plain"`` (diagonal, p = k), ``"banded"`` (|i−j| ≤ d, p = k(2d+1) − d(d+1)),
                 ``"random"`` (p distinct positions seeded by ``layer_seed(seed, name)``: the paper
                 "randomly selects" entries; the official code samples with replacement, so its p may
                 contain duplicates), ``"top-k"`` (the p largest u_iᵀ v_j, the paper's signed score in
                 svdkit's sign convention, i.e. (UᵀV)_ij; for m ≠ n compared on the first min(m, n) coordinates.
                 The official code scores (U·V)_ij instead, and raw entries of the square factor for m ≠ n).
    bands:       d for banded (default 16); for random/top-k it sets p to the banded count (the code's
                 rule), unless ``num_entries`` gives p. d is capped at k − 1 and p at k².
    init:        ``"kaiming"`` (default, METHODS.md §6 [code]: values ~ N(0, 2/p), drawn in fp32 from the
                 layer's generator after any random positions; the model then changes by s·½·U M₀ Vᵀ at
                 step 0, NOT function-preserving, by design: measured on the default model, held-out loss
                 3.493 → 3.535 at init, benchmarks/init_loss.py) or ``"zero"`` (M = 0: the init preserves the
                 function, but ∂L/∂g = 0 at step 0, so the gate only starts to move once M has).
    svd_rank:    None (default: all k components, the paper) or t < k: the official code's optional ``rank``
                 (§6b): keep the top-t singular triplets, M is t×t, and the tail U_tail Σ_tail V_tailᵀ is
                 *discarded* (subtracted as a frozen B₀A₀, so W' = U_t(Σ_t + σ(g)M)V_tᵀ; the function
                 changes at init by design). The code's ``fill_orthonormal`` (a random orthonormal tail) is
                 not offered. Not with ``fold=True``.
    Positions are stored row-major with the adapter (never recomputed at load).
    Defaults: lr 5e-2 (plain; the paper uses 5e-3 for banded d = 16), weight decay 0.

    Memory: by default the layer holds W (untouched) plus U (m×k) and Vᵀ (k×n): (m+n)k/(mn) =
    (m+n)/max(m, n) extra times the weight (×2 in bytes for a bf16 base, factors being fp32). SmolLM2-135M:
    2.0 for 576×576, 1.33 for 192×576, 1.375 for 1536×576 and 576×1536; 1.49 over all its adapted weights.
    Compute: the layer computes the function from U, Σ, V alone, y = b + s·U(Σ/s + σ(g)M)Vᵀx (the paper's
    form; ``Mode.FACTORS``), (m+n)k multiply-adds per token instead of mn + (m+n)k with W in the forward;
    it equals W x + ΔW x up to fp32 rounding (~1e-6 relative; with ``init="zero"`` the init preserves the
    function to that rounding, not bit for bit). W is kept, frozen and unused, so ``unadapt`` is bit-exact.
    ``fold=True`` also drops W (freed unless something else references it): memory (m+n)k instead of
    mn + (m+n)k; ``unadapt`` then restores W = UΣVᵀ up to rounding (as for every ``fold``). With
    ``svd_rank`` the discarded tail is subtracted from W in the forward instead (``Mode.SUBTRACT``).
    """

    pattern: str = "plain"
    bands: int | None = None
    num_entries: int | None = None
    init: str = "kaiming"
    svd_rank: int | None = None

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
        if self.svd_rank is not None and (not isinstance(self.svd_rank, int) or isinstance(self.svd_rank, bool)
                                          or self.svd_rank < 1):
            raise ValueError(f"{cls}: svd_rank must be None (the full SVD) or a positive integer, got {self.svd_rank!r}.")
        if self.svd_rank is not None and self.fold:
            raise ValueError(f"{cls}: svd_rank discards the SVD tail, so the factors no longer stand for W: fold=True "
                             "is not available with it.")
        if self.num_entries is not None and self.bands is not None:
            raise ValueError(f"{cls}: give bands (p = the banded count) or num_entries (p), not both.")

    @property
    def bands_or_default(self) -> int:
        return DEFAULT_BANDS if self.bands is None else self.bands

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        full = min(m, n)
        if self.svd_rank is not None and self.svd_rank >= full:
            raise Refused(f"SVFT: svd_rank={self.svd_rank} must be < min(out, in) = {full} for {names[0]!r} "
                             f"({m}×{n}); use svd_rank=None for the full SVD.")
        U, S, Vh = truncated_svd(weights, full, "top", "exact", dtype=self.dtype)  # cached if enabled
        k = full if self.svd_rank is None else self.svd_rank
        tail = None
        if k < full:  # §6b: the frozen tail s·B₀A₀ = U_tail Σ_tail V_tailᵀ is subtracted (discarded)
            tail = ((U[:, :, k:] * (S[:, None, k:] / self.scaling)).contiguous(), Vh[:, k:, :].contiguous())
            U, S, Vh = U[:, :, :k].contiguous(), S[:, :k], Vh[:, :k, :].contiguous()
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
        if tail is not None:
            return Init(A=Vh, B=U, trainable=frozenset(), subtract=False, core=core, B0=tail[0], A0=tail[1])
        # W = s·U diag(Σ/s) Vᵀ: the layer computes U(Σ + s·σ(g)M)Vᵀx from the factors alone (the paper's form,
        # (m+n)k per token instead of (2mn + (m+n)k) with W in the forward); W stays for unadapt, or is dropped
        # with fold=True (memory (m+n)k instead of mn + (m+n)k)
        core["sigma"] = S / self.scaling
        return Init(A=Vh, B=U, trainable=frozenset(), subtract=False, core=core, weightless=True)

    core_type = SparseCore
