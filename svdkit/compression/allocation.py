"""Rank allocation under a parameter budget: uniform ratios and a global threshold on per-matrix losses.

Pure functions over spectra (σ descending) and shapes (m, n); a rank-k factorization costs k(m + n), a dense
matrix m·n, and a rank is only used where it saves parameters (k(m + n) < m·n).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from svdkit.core.covariance import uniform_rank


def max_saving_rank(m: int, n: int) -> int:
    """The largest k with k(m + n) < m·n (0 if no rank saves parameters)."""
    k = (m * n) // (m + n)
    return k - 1 if k * (m + n) >= m * n else k


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int | None]:
    """SVD-LLM's rule: k = ⌊(1 − ratio)·m·n/(m + n)⌋ for every matrix; dense where k saves nothing or k = 0."""
    out: dict[str, int | None] = {}
    for name, (m, n) in shapes.items():
        k = uniform_rank(m, n, ratio)
        out[name] = k if 0 < k <= max_saving_rank(m, n) else None
    return out


def budget(shapes: dict[str, tuple[int, int]], ratio: float) -> int:
    """Parameters the targets may keep: (1 − ratio)·Σ m·n."""
    return int((1.0 - ratio) * sum(m * n for m, n in shapes.values()))


def cost(shape: tuple[int, int], rank: int | None) -> int:
    m, n = shape
    return m * n if rank is None else rank * (m + n)


def threshold_ranks(
    losses: dict[str, Tensor], shapes: dict[str, tuple[int, int]], ratio: float
) -> dict[str, int | None]:
    """One global threshold τ on comparable per-matrix losses: each matrix takes the smallest rank k with
    loss[k] ≤ τ (``losses[name][k]`` = the loss of keeping k, for k = 0..K, non-increasing; dense where no
    saving rank reaches τ). τ is the smallest value whose total cost fits the budget (1 − ratio)·Σ m·n, found
    by bisection over the sorted candidate losses; the result misses the budget by less than one rank step of
    one matrix (the next smaller τ makes one more (matrix, rank) pair inadmissible).
    """
    limit = budget(shapes, ratio)
    kmax = {name: max_saving_rank(*shapes[name]) for name in shapes}
    curves = {name: losses[name].double()[: kmax[name] + 1].cummin(0).values for name in shapes}

    def choose(tau: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name, curve in curves.items():
            ok = torch.nonzero(curve <= tau)
            k = int(ok[0]) if len(ok) else None
            out[name] = None if k is None or kmax[name] == 0 else max(k, 1)
        return out

    total: Callable[[dict], int] = lambda ranks: sum(cost(shapes[n], r) for n, r in ranks.items())  # noqa: E731
    values = torch.unique(torch.cat([c for c in curves.values()]))  # ascending
    lo, hi = 0, len(values) - 1  # choose(values[-1]) keeps the least; find the smallest fitting τ
    if total(choose(float(values[hi]))) > limit:
        return choose(float(values[hi]))
    while lo < hi:
        mid = (lo + hi) // 2
        if total(choose(float(values[mid]))) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return choose(float(values[lo]))


def capped_shares(scores: list[float], sizes: list[int], target: float, caps: list[float]) -> list[float]:
    """Ratios r_i = min(cap_i, c·s_i) proportional to ``scores`` with Σ r_i·size_i = target·Σ size_i (water-filling).

    c is found by fixing the capped set and solving for the rest until no new ratio exceeds its cap, so the
    share a capped entry cannot take goes to the others instead of being lost. If even capping every entry
    falls short, every ratio is its cap.
    """
    if not len(scores) == len(sizes) == len(caps) or any(s < 0 for s in scores) or not all(0 < c <= 1 for c in caps):
        raise ValueError("capped_shares: one non-negative score and one cap in (0, 1] per size.")
    want = target * sum(sizes)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(scores)) if i not in capped]
        mass = sum(scores[i] * sizes[i] for i in free)
        if not free or mass <= 0:
            return [caps[i] if i in capped else 0.0 for i in range(len(scores))]
        c = (want - sum(caps[i] * sizes[i] for i in capped)) / mass
        over = {i for i in free if c * scores[i] > caps[i]}
        if not over:
            return [caps[i] if i in capped else max(c * scores[i], 0.0) for i in range(len(scores))]
        capped |= over


def tail_energy(S: Tensor) -> Tensor:
    """[Σ_{i>k} σ_i² / Σ σ_i² for k = 0..len(S)]: the relative truncation loss of keeping k."""
    sq = S.double().square()
    tail = torch.cat([sq.flip(0).cumsum(0).flip(0), sq.new_zeros(1)])
    return tail / sq.sum().clamp(min=1e-300)
