"""SLoRA, NLoRA, IntTune (METHODS.md §17) and MultiLoRA (§19).

Trainable parameters per matrix: r(m+n) + r² (SLoRA, NLoRA), r² (IntTune), n·r(m+n) + n (MultiLoRA).
NLoRA and IntTune change the function at init by design: W' = W + s·W[:, :r] N₀ W[:r, :], with
N₀ = W[:r, :r]⁺ (the paper) or W[:r, :r] (the official code), recomputed here in float64 with the
pseudo-inverse written out from an SVD.
"""

import torch

from rows import Row


def _three_matrix(W, cfg, bias):
    r = cfg.rank
    return r * (W.shape[0] + W.shape[1]) + r * r


def _core_only(W, cfg, bias):
    return cfg.rank**2


def _multilora(W, cfg, bias):
    return cfg.n_loras * cfg.rank * (W.shape[0] + W.shape[1]) + cfg.n_loras


def _nystrom_weight(W, cfg, name):
    r, W64 = cfg.rank, W.double()
    corner = W64[:r, :r]
    if cfg.nystrom_core == "pinv":
        U, S, Vh = torch.linalg.svd(corner)
        N0 = Vh.T @ torch.diag(1.0 / S) @ U.T
    else:
        N0 = corner
    return (W64 + cfg.scaling * W64[:, :r] @ N0 @ W64[:r, :]).to(W.dtype)


ROWS = [
    Row("slora", dict(rank=4), params=_three_matrix),
    Row("nlora", dict(rank=4), params=_three_matrix, id="nlora-preserving"),  # the default: W at init
    Row("nlora", dict(rank=4, nystrom_core="pinv", preserve_init=False), params=_three_matrix,
        init_weight=_nystrom_weight),  # fmt: skip
    # the code's N = W[:r, :r] makes a cubic, small change: α = 64 (s = 16) makes it measurable
    Row("nlora", dict(rank=4, alpha=64, nystrom_core="slice", preserve_init=False), params=_three_matrix,
        init_weight=_nystrom_weight, id="nlora-slice"),  # fmt: skip
    Row("inttune", dict(rank=4), params=_core_only, id="inttune-preserving"),
    Row("inttune", dict(rank=4, nystrom_core="pinv", preserve_init=False), params=_core_only,
        init_weight=_nystrom_weight),  # fmt: skip
    Row("multilora", dict(rank=4), params=_multilora),
    Row("multilora", dict(rank=2, n_loras=2, alpha=8, use_rslora=True), params=_multilora, id="multilora-rslora"),
]
