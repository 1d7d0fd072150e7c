"""Incremental (streaming) PCA of layer inputs, as EVA uses it (https://arxiv.org/abs/2410.07170).

Pure functions on a state dict of tensors (so a calibration statistic can hold it). Rows arrive in
batches X_t (k × n); after each batch the state holds the top-c principal components of every row seen
so far, with the mean-centred incremental SVD update of Ross et al. 2008 (the one scikit-learn's
``IncrementalPCA.partial_fit`` uses):

    Y = [ diag(σ) V ;  X_t − x̄_t ;  √(N k/(N + k))·(μ − x̄_t) ],   Y ≈ U diag(σ′) V′   (top c, σ′ descending)

with μ, N the running mean and row count, and x̄_t the batch mean. The scatter Σ‖x − μ‖² is updated
exactly (Chan et al.) and explained_variance_ratio_i = σ_i² / Σ‖x − μ‖². The SVD of Y is either exact or
svdkit.core.linalg's seeded randomized SVD with q = 2c sketch columns (oversample = c, EVA's ``svd_lowrank``
with q = 2c). Signs are deterministic: the largest-magnitude entry of every component is positive.

Convergence (EVA): after each update the cosine similarity between every new component and the same
component before the update is recorded; the PCA has converged when all c similarities are ≥ τ. The
absolute cosine is used (a component is defined up to sign; EVA's code compares signed cosines, so a
flip of the sign rule between two updates counts there as not converged).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from svdkit.core.linalg import fix_signs, svd_exact, svd_randomized

SVD_METHODS = ("exact", "randomized")


def ipca_start(n: int, components: int, device=None, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """An empty state for ``components`` principal components of n-dimensional rows (c is capped at n)."""
    c = min(components, n)
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    return {
        "mean": zeros(n),  # μ
        "scatter": zeros(()),  # Σ ‖x − μ‖² over every row seen
        "count": zeros(()),  # N
        "steps": zeros(()),  # updates applied
        "components": zeros(c, n),  # V (c × n), orthonormal rows
        "singular_values": zeros(c),  # σ of the centred data seen so far
        "similarity": zeros(c),  # cos(v_i, v_i before the last update)
    }


def _top_svd(Y: Tensor, c: int, svd: str, niter: int, seed: int) -> tuple[Tensor, Tensor]:
    """(σ (c,), V (c × n)) of Y, with the largest-magnitude entry of every row of V positive. When Y has
    fewer than c rows (a first batch smaller than c) the missing components are zero rows with σ = 0."""
    k = min(c, Y.shape[0])
    if svd == "exact":
        U, S, Vh = svd_exact(Y, k, "top", Y.dtype)
    else:
        U, S, Vh = svd_randomized(Y, k, [seed], niter=niter, oversample=k, dtype=Y.dtype)
    V, _ = fix_signs(Vh.mT, U.mT)  # the sign rule applied to the right singular vectors (EVA's svd_flip on V)
    pad = c - k
    return torch.cat([S, S.new_zeros(pad)]), torch.cat([V.mT, V.new_zeros(pad, V.shape[0])])


def ipca_update(
    state: dict[str, Tensor], X: Tensor, svd: str = "randomized", niter: int = 4, seed: int = 0
) -> None:
    """Fold the rows of X (k × n, k ≥ 1) into ``state`` in place. The randomized SVD of step t is seeded
    with ``seed + t``. Every row counts: a first batch of k < c rows gives k components (the others are
    zero with σ = 0 until more rows arrive); EVA's code skips every batch of fewer than c rows instead.
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"incremental PCA: svd must be one of {SVD_METHODS}, got {svd!r}.")
    V_old = state["components"]
    c, n = V_old.shape
    if X.ndim != 2 or X.shape[1] != n:
        raise ValueError(f"incremental PCA: expected rows of width {n} (a k × {n} matrix), got shape {tuple(X.shape)}.")
    k = X.shape[0]
    if k == 0:
        return
    X = X.to(V_old)
    N = float(state["count"])
    x_bar = X.mean(0)
    centred = X - x_bar
    weight = N * k / (N + k)  # Chan et al.: the between-means term of the pooled scatter
    shift = state["mean"] - x_bar
    if N == 0:
        Y = centred
    else:
        Y = torch.cat([state["singular_values"][:, None] * V_old, centred, math.sqrt(weight) * shift[None]])
    S, V = _top_svd(Y, c, svd, niter, seed + int(state["steps"]))
    state["scatter"] += centred.square().sum() + weight * shift.square().sum()
    state["mean"] -= shift * (k / (N + k))  # μ' = (N μ + k x̄)/(N + k)
    state["count"] += k
    state["similarity"].copy_((V * V_old).sum(-1).abs())  # unit rows: |v·v_old| is |cos|, blind to a sign flip
    state["components"].copy_(V)
    state["singular_values"].copy_(S)
    state["steps"] += 1


def ipca_converged(state: dict[str, Tensor], tau: float) -> bool:
    """True once two consecutive updates agree: cos(v_i, v_i before) ≥ τ for every component i."""
    return int(state["steps"]) >= 2 and bool((state["similarity"] >= tau).all())


def explained_variance_ratio(state: dict[str, Tensor]) -> Tensor:
    """σ_i² / Σ‖x − μ‖²: the share of the total variance each component explains (zeros before any data)."""
    total = state["scatter"]
    if float(total) <= 0:
        return torch.zeros_like(state["singular_values"])
    return state["singular_values"].square() / total
