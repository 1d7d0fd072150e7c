"""Statistics of one matrix's spectrum: pure functions of its singular values (and shape).

    fit = powerlaw_fit(lam)            # HTSR α of the ESD, x_min by the KS distance (WeightWatcher's fit)
    mp = mp_bulk(S, m, n)              # Marchenko–Pastur bulk edge from the median σ, and the spikes above it
    row = spectral_metrics(lam, m, n)  # every σ-only column of svdkit.spectrum()

Notation: W is m×n, q = min(m, n), σ₁ ≥ … ≥ σ_q ≥ 0 and λ_i = σ_i² (the empirical spectral density, ESD,
of WᵀW as WeightWatcher defines it, without a 1/N normalization).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from svdkit.core.linalg_rank import effective_rank, energy_rank

ALPHA_BAND = (2.0, 6.0)  # HTSR: α < 2 "over-trained", α > 6 "under-trained" (weightwatcher.ai)
_CHUNK = 1 << 22  # entries of the (candidate × eigenvalue) KS matrix held at once (32 MiB in fp64)
_BANDS = 6  # at least this many bands of candidates: band k scores only the eigenvalues from its first candidate on


def powerlaw_fit(lam: Tensor, floor: float = 1e-10) -> dict:
    """Continuous power-law fit p(λ) ∝ λ^{-α} of the tail λ ≥ x_min, with x_min chosen by the KS distance.

    Clauset, Shalizi & Newman 2009 (https://arxiv.org/abs/0706.1062), as WeightWatcher fits it
    (Martin & Mahoney, https://arxiv.org/abs/1810.01075): with x ascending and each candidate x_min = x_i
    (every eigenvalue but the largest), n = #{x_j ≥ x_i},

        α_i = 1 + n / Σ_{j≥i} ln(x_j / x_i)                                   (MLE)
        D_i = max_{j≥i} | 1 − (x_j / x_i)^{1−α_i} − (j − i)/n |                (KS distance)

    and the fit is the candidate with the smallest D (α ≤ 1 candidates get D = 1, as in WeightWatcher).
    σ_α = (α − 1)/√n is the MLE's standard error. Eigenvalues ≤ ``floor``·λ_max are left out (numerical zeros
    of a rank-deficient matrix; WeightWatcher keeps them and can return a spurious fit on them). All
    candidates are scored in a few vectorized bands of rows, each over the eigenvalues j ≥ its first i (about
    60 % of the full N × N matrix for 6 bands), in fp64.

    Returns {alpha, xmin, xmax, D, sigma, num_pl_spikes}; NaNs when fewer than 3 eigenvalues remain.
    """
    x = torch.as_tensor(lam).detach().to("cpu", torch.float64).flatten()
    x = x[torch.isfinite(x)]
    x, _ = torch.sort(x[x > floor * float(x.max())] if x.numel() and float(x.max()) > 0 else x[:0])
    N = x.numel()
    if N < 3:
        nan = float("nan")
        return {"alpha": nan, "xmin": nan, "xmax": nan, "D": nan, "sigma": nan, "num_pl_spikes": 0}
    logx = x.log()
    suffix = logx.flip(0).cumsum(0).flip(0)  # Σ_{j≥i} ln x_j
    i = torch.arange(N - 1, dtype=torch.float64)
    n = N - i
    denom = suffix[:-1] - n * logx[:-1]
    alphas = torch.where(denom > 0, 1 + n / denom.clamp_min(1e-300), torch.full_like(n, float("inf")))
    D = torch.ones(N - 1, dtype=torch.float64)
    j = torch.arange(N, dtype=torch.float64)
    rows = max(1, min(_CHUNK // N, -(-(N - 1) // _BANDS)))
    for start in range(0, N - 1, rows):
        stop = min(N - 1, start + rows)
        ii, a, nn = j[start:stop], alphas[start:stop], n[start:stop]
        # columns j ≥ start only (a band of rows skips the lower triangle, where every gap is 0); there,
        # (x_j/x_i)^{1−α} and (j − i)/n are clamped so that every j < i gives a gap of exactly 0 (in place)
        tail = (logx[start:].unsqueeze(0) - logx[start:stop].unsqueeze(1)).clamp_(min=0).mul_((1 - a).unsqueeze(1)).exp_()
        empirical = (j[start:].unsqueeze(0) - ii.unsqueeze(1)).div_(nn.unsqueeze(1)).clamp_(min=0)
        gap = tail.add_(empirical).sub_(1).abs_()  # |1 − (x_j/x_i)^{1−α} − (j − i)/n|
        ok = torch.isfinite(a) & (a > 1)
        D[start:stop] = torch.where(ok, gap.amax(dim=1), torch.ones_like(a))
    best = int(torch.argmin(D))
    alpha = float(alphas[best])
    return {"alpha": alpha, "xmin": float(x[best]), "xmax": float(x[-1]), "D": float(D[best]),
            "sigma": (alpha - 1) / math.sqrt(float(n[best])), "num_pl_spikes": int(n[best])}  # fmt: skip


@functools.lru_cache(maxsize=256)  # one value per aspect ratio: a model has a handful
def mp_median(beta: float, grid: int = 20001) -> float:
    """Median of the Marchenko–Pastur law of aspect ratio β = q/p ≤ 1 (unit variance, λ of XᵀX/p):
    support [(1 − √β)², (1 + √β)²], density √((λ₊ − λ)(λ − λ₋)) / (2π β λ). Integrated numerically
    (trapezoid rule on a grid dense near the edges)."""
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}.")
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    t = torch.linspace(0, math.pi, grid, dtype=torch.float64)
    lam = lo + (hi - lo) * (1 - torch.cos(t)) / 2  # λ(t): dense at both edges, where the density is steep
    tm = (t[1:] + t[:-1]) / 2  # midpoint rule in t: finite even where the β = 1 density diverges at λ = 0
    lm = lo + (hi - lo) * (1 - torch.cos(tm)) / 2
    dens = ((hi - lm) * (lm - lo)).clamp_min(0).sqrt() / (2 * math.pi * beta * lm)
    mass = dens * (hi - lo) / 2 * torch.sin(tm) * (t[1] - t[0])
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(mass, 0)])
    cdf = cdf / cdf[-1]
    k = int(torch.searchsorted(cdf, torch.tensor([0.5], dtype=torch.float64)))
    w = float((0.5 - cdf[k - 1]) / (cdf[k] - cdf[k - 1]))
    return float(lam[k - 1] + w * (lam[k] - lam[k - 1]))


def mp_bulk(S: Tensor, m: int, n: int) -> dict:
    """The Marchenko–Pastur bulk edge of σ and the spikes above it.

    Model: W = signal + noise with i.i.d. entries of variance σ_n². With p = max(m, n), q = min(m, n) and
    β = q/p, the noise's singular values fill [σ_n(√p − √q), σ_n(√p + √q)]. σ_n is estimated from the
    median singular value, which the few spikes barely move (Gavish & Donoho 2014,
    https://arxiv.org/abs/1305.5870): σ_n = σ_med / √(p·μ_β), μ_β = :func:`mp_median`. Closed form instead of
    WeightWatcher's KDE grid search. The edge gets the Tracy–Widom margin WeightWatcher adds,
    λ₊ → λ₊ + λ₊^{2/3}·β^{1/2}·q^{−2/3} on the normalized scale, so pure noise rarely has a spike.

    Returns {mp_sigma (σ_n), mp_edge (bulk edge of σ), mp_spikes (#σ > edge), mp_softrank (λ₊/λ_max)}.
    """
    s = torch.as_tensor(S).detach().to("cpu", torch.float64).flatten().sort(descending=True).values
    p, q = max(m, n), min(m, n)
    beta = q / p
    med = float(s.median()) if s.numel() else 0.0
    noise = med / math.sqrt(p * mp_median(beta)) if med > 0 else 0.0
    lam_plus = (1 + math.sqrt(beta)) ** 2  # normalized edge (λ of XᵀX/p, unit variance)
    lam_plus += lam_plus ** (2 / 3) * math.sqrt(beta) * q ** (-2 / 3)
    edge = noise * math.sqrt(p * lam_plus)
    spikes = int((s > edge).sum()) if noise > 0 else 0
    top = float(s[0]) if s.numel() else 0.0
    return {"mp_sigma": noise, "mp_edge": edge, "mp_spikes": spikes, "mp_softrank": (edge / top) ** 2 if top > 0 else float("nan")}


def alpha_warning(alpha: float) -> str:
    """WeightWatcher's label: 'over-trained' below α = 2, 'under-trained' above α = 6, '' inside or NaN."""
    if math.isnan(alpha):
        return ""
    return "over-trained" if alpha < ALPHA_BAND[0] else "under-trained" if alpha > ALPHA_BAND[1] else ""


def spectral_metrics(lam: Tensor, m: int, n: int, floor: float = 1e-10) -> dict:
    """Every column of a spectrum row that depends on the eigenvalues λ = σ² alone (m×n matrix):

    sigma_max σ₁; frobenius ‖W‖_F = √Σλ; nuclear ‖W‖_* = Σσ; stable_rank ‖W‖²_F/σ₁²; effective_rank
    exp(H(σ/Σσ)) (Roy & Vetterli 2007); rank_90 / rank_99, the smallest r with Σ_{i≤r}σ² ≥ 90 / 99 % of ‖W‖²_F
    (:func:`svdkit.core.linalg_rank.energy_rank`); the power-law fit
    (alpha, alpha_xmin, alpha_D, alpha_sigma, num_pl_spikes, :func:`powerlaw_fit`); alpha_weighted
    α·log₁₀λ_max and log_spectral_norm log₁₀λ_max and log_norm log₁₀‖W‖²_F (WeightWatcher's scale
    metrics, with its λ_max = σ₁²); the MP bulk (:func:`mp_bulk`); warning (:func:`alpha_warning`).
    ``floor``: eigenvalues ≤ floor·λ_max are left out of the power-law fit (below the precision they were
    computed in; :func:`powerlaw_fit`).
    """
    lam = torch.as_tensor(lam).detach().to("cpu", torch.float64).flatten().clamp_min(0).sort(descending=True).values
    S = lam.sqrt()
    top, energy = float(lam[0]), float(lam.sum())
    if energy == 0:
        raise ValueError(f"the {m}×{n} matrix is all zeros: its spectral statistics are undefined.")
    fit = powerlaw_fit(lam, floor)
    row = {"sigma_max": math.sqrt(top), "frobenius": math.sqrt(energy), "nuclear": float(S.sum()),
           "stable_rank": energy / top, "effective_rank": effective_rank(S),
           "rank_90": energy_rank(S, 0.90), "rank_99": energy_rank(S, 0.99),
           "alpha": fit["alpha"], "alpha_xmin": fit["xmin"], "alpha_D": fit["D"], "alpha_sigma": fit["sigma"],
           "num_pl_spikes": fit["num_pl_spikes"], "alpha_weighted": fit["alpha"] * math.log10(top),
           "log_spectral_norm": math.log10(top), "log_norm": math.log10(energy)}  # fmt: skip
    row.update(mp_bulk(S, m, n))
    row["warning"] = alpha_warning(fit["alpha"])
    return row
