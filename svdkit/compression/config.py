"""Compression configs: the options every compression method shares, validated at construction.

A method is one frozen config class (one level below :class:`CompressConfig`) registered with
:func:`svdkit.core.registry.register` under ``kind = "compress"``. The engine (:mod:`svdkit.compression.api`)
asks it three things per target linear W (m × n, ``nn.Linear`` layout):

* ``transform(name, W, stats)`` → (S, S⁻¹): the input-space transform whose SVD W S = U Σ Vᵀ is truncated,
  W' = U_k Σ_k V_kᵀ S⁻¹ (None: plain SVD; an (n,) vector: a diagonal scaling; an n × n matrix: whitening);
* ``allocate(spectra, shapes)`` → rank per module (None: leave it dense), given every module's σ(W S);
* ``statistic()`` → the :class:`svdkit.core.calibration.Statistic` a data-aware method measures.

A ``structured`` method instead rewrites groups of modules itself (``compress_model``: clover-prune's
value/output pairs per attention block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from svdkit.compression.allocation import uniform_ranks
from svdkit.core.registry import config_to_dict

SVD_METHODS = ("exact", "randomized")


@dataclass(frozen=True)
class CompressConfig:
    """Options every compression method shares.

    ratio:       fraction of the target linears' parameters removed, in (0, 1). A rank-k factorization of an
                 m × n matrix holds k(m + n) parameters; a matrix whose rank would not save parameters stays dense.
    targets:     a preset (``"all-linear"``, ``"attention"``, ``"mlp"``) or regex(es) of module names.
    exclude:     regex of module names to leave dense.
    svd:         ``"exact"`` (LAPACK, float64) or ``"randomized"`` (seeded per layer, sign-fixed) for the truncation.
    niter, oversample, seed: the randomized SVD's power iterations, extra sketch columns and base seed.
    """

    ratio: float = 0.2
    targets: str | tuple[str, ...] = "all-linear"
    exclude: str | None = None
    svd: str = "exact"
    niter: int = 4
    oversample: int = 8
    seed: int = 0

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "compress"
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    uses_calibration: ClassVar[bool] = False
    calibration_samples: ClassVar[int] = 16  # the CLI's default number of calibration sequences
    whitening: ClassVar[bool] = False  # True: transform() is a full n × n matrix from an input covariance

    def __post_init__(self) -> None:
        cls = type(self).__name__
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ValueError(f"{cls}: ratio is the fraction of parameters removed and must lie in (0, 1), got "
                             f"{self.ratio!r} (0.2 removes 20 %).")  # fmt: skip
        if self.svd not in SVD_METHODS:
            raise ValueError(f"{cls}: svd must be one of {SVD_METHODS}, got {self.svd!r}.")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        for field in ("niter", "oversample", "seed"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{cls}: {field} must be a non-negative integer, got {value!r}.")

    def statistic(self):
        raise NotImplementedError(f"{type(self).__name__} does not use calibration data.")

    def transform(self, name: str, weight: Tensor, stats: dict[str, Tensor] | None) -> tuple[Tensor | None, Tensor | None]:
        """(S, S⁻¹) for module ``name``; default: none (plain SVD)."""
        return None, None

    def allocate(self, spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]]) -> dict[str, int | None]:
        """Rank per module (None: dense). Default: the same ratio for every matrix (uniform_ranks)."""
        return uniform_ranks(shapes, self.ratio)

    needs_spectra: ClassVar[bool] = False  # True: allocate() reads every module's spectrum first
    structured: ClassVar[bool] = False  # True: compress_model() rewrites the model itself (modules in groups)

    def compress_model(self, model, targets: list, progress: bool | None = None) -> list:
        """Compress ``model`` in place from the selected ``targets`` and return the report rows; only for
        ``structured`` methods (their modules change together, e.g. clover-prune's value/output pairs)."""
        raise NotImplementedError(f"{type(self).__name__} compresses module by module (structured = False).")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)
