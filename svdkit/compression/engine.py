"""One compressed module: transform, truncate, (optionally) update, swap in the factored linear, report.

Shared by the whole-model path (:func:`svdkit.compression.api.compress` with a ``Calibration``) and the
layer-by-layer path (:mod:`svdkit.compression.streaming`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from svdkit.adapters.layers import weight_matrix
from svdkit.compression.layers import LowRankLinear
from svdkit.core.covariance import least_squares_left, whitened_truncation
from svdkit.core.linalg import check_matrix, layer_seed
from svdkit.core.targets import is_conv1d


@dataclass
class ModuleRow:
    """One target's outcome: rank (None: left dense), parameters, kept energy Σ_{i≤k}σ²/Σσ² of σ(W S),
    and the relative calibration error ‖(W − W')X‖²_F/‖WX‖²_F (None without an input covariance)."""

    name: str
    shape: tuple[int, int]
    rank: int | None
    params_before: int
    params_after: int
    kept_energy: float | None = None
    calibration_error: float | None = None
    updated: bool = False
    extra: dict = field(default_factory=dict)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def spectrum(cfg, name: str, module: nn.Module, stats) -> Tensor:
    """σ(W S) in float64, descending (what rank allocation reads)."""
    W = weight_matrix(module).detach().double()
    S, _ = transform(cfg, name, W, stats)
    M = W if S is None else (W * S.to(W) if S.ndim == 1 else W @ S.to(W))
    X = M.mT if M.shape[0] > M.shape[1] else M
    return torch.linalg.eigvalsh(X @ X.mT).flip(-1).clamp(min=0).sqrt()  # σ from the smaller Gram matrix


_LAST: dict = {}


def transform(cfg, name: str, W: Tensor, stats):
    """cfg.transform, reused for consecutive modules that share their statistics (q/k/v, gate/up)."""
    key = (id(cfg), id(stats), W.shape[-1])
    if stats is None or _LAST.get("key") != key:
        _LAST.clear()
        _LAST.update(key=key, value=cfg.transform(name, W, stats), stats=stats)  # stats held: ids stay unique
    return _LAST["value"]


def compress_module(model, cfg, name: str, module: nn.Module, rank: int | None, stats,
                    covariance: Tensor | None = None, update: tuple[Tensor, Tensor] | None = None) -> ModuleRow:  # fmt: skip
    """Replace ``name`` by its rank-``rank`` factorization (or leave it dense when ``rank`` is None).

    ``covariance`` (n × n, X_oᵀX_o up to scale) gives the calibration error; ``update`` = (X_oᵀX_c, X_cᵀX_c)
    re-solves the left factor by least squares (SVD-LLM v1's closed-form update).
    """
    W = weight_matrix(module).detach()
    check_matrix(W, name)
    m, n = W.shape
    if rank is None:
        return ModuleRow(name, (m, n), None, m * n, m * n, 1.0, 0.0 if covariance is not None else None)
    S, S_inv = transform(cfg, name, W, stats)
    A, B, sigma, total = whitened_truncation(W, S, S_inv, rank, cfg.svd, layer_seed(cfg.seed, name), cfg.niter, cfg.oversample)
    if update is not None:
        A = least_squares_left(W, B, *update)
    kept = float(sigma[:rank].square().sum() / max(total, 1e-300))
    error = None
    if covariance is not None:
        D = W.double() - A @ B
        C = covariance.to(D)
        error = float(((D @ C) * D).sum() / ((W.double() @ C) * W.double()).sum().clamp(min=1e-300))
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    layer = LowRankLinear.from_factors(A.to(W.device), B.to(W.device), bias, W.dtype)
    layer.train(module.training)
    layer.conv1d = is_conv1d(module)
    replace_module(model, name, layer)
    return ModuleRow(name, (m, n), rank, m * n, rank * (m + n), kept, error, update is not None)
