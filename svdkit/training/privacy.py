"""DP-SGD pieces: per-example clipping with Gaussian noise, and the privacy accountant we report.

DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133): each step samples a batch by Poisson sampling
(every example independently with probability q), clips each example's gradient to norm ≤ C, sums, adds
N(0, (zC)²) per coordinate and divides by the expected batch size qN.

Accounting: Rényi DP of the Poisson-subsampled Gaussian mechanism at integer orders α (Mironov, Talwar &
Zhang 2019, https://arxiv.org/abs/1908.10530, §3.3, exact for integer α under add/remove adjacency):

    A_α = Σ_{k=0}^{α} C(α, k) (1 − q)^{α−k} q^k exp((k² − k) / (2z²)),     ε_RDP(α) = log A_α / (α − 1),

composed additively over T steps, converted to (ε, δ)-DP by ε = min_α T·ε_RDP(α) + log(1/δ)/(α − 1)
(Mironov 2017, https://arxiv.org/abs/1702.07476, Prop. 3: the classic conversion, a little looser than
the one Opacus uses). Orders 2..256. The guarantee is per example of one client's data (record-level DP
of the client's local training); client-level DP would need clipping whole client updates instead.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

ORDERS = tuple(range(2, 257))


def rdp_sampled_gaussian(q: float, noise: float, order: int) -> float:
    """ε_RDP(α) of one step of the Poisson-subsampled Gaussian mechanism (sampling rate q, noise multiplier z)."""
    if not 0 <= q <= 1 or noise <= 0 or int(order) != order or order < 2:
        raise ValueError(f"rdp_sampled_gaussian needs 0 ≤ q ≤ 1, noise > 0 and an integer order ≥ 2; got {q}, {noise}, {order}.")
    if q == 0:
        return 0.0
    if q == 1:
        return order / (2 * noise**2)
    a = int(order)
    terms = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) + (a - k) * math.log1p(-q)
             + k * math.log(q) + (k * k - k) / (2 * noise**2) for k in range(a + 1)]  # fmt: skip
    top = max(terms)
    return (top + math.log(sum(math.exp(t - top) for t in terms))) / (a - 1)


def epsilon(q: float, noise: float, steps: int, delta: float, orders: Sequence[int] = ORDERS) -> tuple[float, int]:
    """(ε, the best order) of ``steps`` compositions at (q, z), for the given δ."""
    if not 0 < delta < 1 or steps < 0:
        raise ValueError(f"epsilon needs 0 < delta < 1 and steps ≥ 0; got {delta}, {steps}.")
    best = min((steps * rdp_sampled_gaussian(q, noise, a) + math.log(1 / delta) / (a - 1), a) for a in orders)
    return best


def poisson_sample(n: int, q: float, generator: torch.Generator) -> list[int]:
    """Indices of the examples a Poisson-sampled batch holds (each independently with probability q)."""
    return torch.nonzero(torch.rand(n, generator=generator) < q).flatten().tolist()


def clipped_noisy_gradient(params: list, per_example_loss, n_examples: int, clip: float, noise: float,
                           expected_batch: float, generator: torch.Generator) -> list[torch.Tensor]:  # fmt: skip
    """DP-SGD's gradient: (Σᵢ gᵢ·min(1, C/‖gᵢ‖) + N(0, (zC)²)) / expected_batch for each of ``params``.

    ``per_example_loss(i)`` returns example i's loss (a scalar tensor); each example's gradient is computed by
    its own backward pass (exact, no vmap; one example at a time keeps memory at one gradient). ‖gᵢ‖ is the
    norm over all ``params`` together (flat clipping). The noise is drawn from ``generator`` (seeded by the caller).
    """
    if clip <= 0:
        raise ValueError(f"the DP clipping norm must be positive, got {clip}.")
    total = [torch.zeros_like(p) for p in params]
    for i in range(n_examples):
        grads = torch.autograd.grad(per_example_loss(i), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = min(1.0, clip / max(float(norm), 1e-12))
        for t, g in zip(total, grads):
            t.add_(g, alpha=factor)
    if noise > 0:
        for t in total:
            t.add_(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) * (noise * clip))
    return [t / expected_batch for t in total]
