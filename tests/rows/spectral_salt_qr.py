"""Spectral Adapter A/R, SALT, QR-LoRA: trainable counts from METHODS.md §13, §8, §14; all function-preserving.

QR-LoRA's per-layer rank is recomputed here from an independent pivoted QR (greedy Gram–Schmidt with
re-orthogonalization in fp64: |R_jj| is the largest residual column norm at step j).
"""

import math

import torch

from rows import Row


def reference_pivoted_gs(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|R_jj|, the basis q_j) of the column-pivoted QR of W, by greedy classical Gram–Schmidt, projected
    twice, in fp64: at step j the column with the largest residual norm is normalized into q_j."""
    W = W.detach().double()
    Q = W.new_zeros(W.shape[0], 0)
    diag = []
    for _ in range(min(W.shape)):
        residual = W - Q @ (Q.T @ W)
        residual = residual - Q @ (Q.T @ residual)  # twice is enough
        norms = residual.norm(dim=0)
        j = int(norms.argmax())
        diag.append(float(norms[j]))
        if norms[j] == 0:
            break
        Q = torch.cat([Q, (residual[:, j] / norms[j])[:, None]], 1)
    return torch.tensor(diag + [0.0] * (min(W.shape) - len(diag)), dtype=torch.float64), Q


def reference_qr_rank(W: torch.Tensor, tau: float, energy: str = "abs", max_rank=None) -> int:
    """The smallest r whose share of the diagonal energy (|R_ii| or R_ii²) reaches tau, capped."""
    e = reference_pivoted_gs(W)[0]
    e = e**2 if energy == "squared" else e
    total, running = float(e.sum()), 0.0
    for r, value in enumerate(e.tolist(), start=1):
        running += value
        if running >= tau * total:
            break
    return r if max_rank is None else min(r, max_rank)


def salt_params(W, cfg, bias) -> int:
    k = min(W.shape)
    t = max(1, math.floor(cfg.top_fraction * k))
    return 2 * t + 2 * cfg.rank * (k - t)


ROWS = [
    Row("spectral-a", dict(rank=4)),
    Row("spectral-a", dict(rank=4, svd="randomized", niter=2, fold=True), id="spectral-a-randomized-fold"),
    Row("spectral-r", dict(rank=4), params=lambda W, cfg, bias: cfg.rank * (cfg.rank - 1)),
    Row("salt", dict(rank=4, top_fraction=0.2), params=salt_params),
    Row("qr-lora", dict(tau=0.9), params=lambda W, cfg, bias: reference_qr_rank(W, cfg.tau, cfg.energy, cfg.max_rank)),
    Row("qr-lora", dict(tau=0.5, energy="squared", max_rank=6), id="qr-lora-squared-capped",
        params=lambda W, cfg, bias: reference_qr_rank(W, cfg.tau, cfg.energy, cfg.max_rank)),
]
