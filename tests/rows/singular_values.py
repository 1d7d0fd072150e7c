"""SVFit, CLIP-SVD, VectorFit (METHODS.md §7): trainable singular values, function-preserving at init.

Per matrix: SVFit r (with ``energy``: the smallest r whose top-r σ² share reaches it, capped at rank),
CLIP-SVD min(m, n), VectorFit min(m, n) plus m where the layer has a bias.
"""

import torch

from rows import Row


def energy_r(W, cfg, bias):
    """min(rank, smallest r with Σ_{i≤r} σᵢ² ≥ energy·Σσᵢ²), from an independent fp64 SVD."""
    S2 = torch.linalg.svdvals(W.double()).square()
    share = torch.cumsum(S2, 0) / S2.sum()
    return min(cfg.rank, next(i + 1 for i, c in enumerate(share.tolist()) if c >= cfg.energy - 1e-12))


ROWS = [
    Row("svfit", dict(rank=4), params=lambda W, cfg, bias: cfg.rank),
    Row("svfit", dict(rank=4, svd="randomized", niter=2), params=lambda W, cfg, bias: cfg.rank, id="svfit-randomized"),
    Row("svfit", dict(rank=8, energy=0.3), params=energy_r, id="svfit-energy"),
    Row("clip-svd", params=lambda W, cfg, bias: min(W.shape)),
    Row("vectorfit", params=lambda W, cfg, bias: min(W.shape) + (W.shape[0] if bias else 0)),
]
