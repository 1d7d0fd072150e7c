"""``svd-llm-v2``: heterogeneous ratios + loss-optimized truncation (Wang et al., NAACL 2025, https://arxiv.org/abs/2503.12340).

The authors' code is unreleased; this is the formulation below, from the paper's equations as quoted in the
SVD-LLM issue tracker (#46, #47), with every ambiguity resolved as stated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from svdkit.compression.allocation import capped_shares, max_saving_rank
from svdkit.compression.config import CompressConfig
from svdkit.core.covariance import eigen_whitening, uniform_rank
from svdkit.core.registry import register
from svdkit.core.statistics import InputCovariance

_INDEX = re.compile(r"\.\d+\.")
CAP = 0.99  # the most of one matrix a ratio may remove
PAPER_TOKENS = 256 * 2048  # the paper's calibration data: 256 WikiText-2 sequences of 2048 tokens
SCORES = ("paper", "relative")


@register
@dataclass(frozen=True)
class SVDLLMV2(CompressConfig):
    """SVD-LLM V2:

    1. Loss-optimized truncation (Theorem 3.1): XᵀX = U_s Λ U_sᵀ (eigh), S = U_s Λ^{1/2}, W S = U Σ Vᵀ,
       W' = (U_k Σ_k^{1/2})(Σ_k^{1/2} V_kᵀ Λ^{-1/2} U_sᵀ). Needs no positive definiteness: eigenvalues at
       rounding level are dropped (pseudo-inverse, :func:`eigen_whitening`).
    2. Heterogeneous ratios: matrices are grouped by type (the module name with its block index removed:
       every ``self_attn.q_proj`` together). For each matrix i of a group G, L_i = √(Σ_{j>k_R} σ_j²) is its
       theoretical truncation loss at the uniform rank k_R of the target ratio R; its ratio is
       R_i = |G|·R·s_i/Σ_G s (equal shapes; in general R_i = c·s_i with Σ_G R_i·m_i n_i = R·Σ_G m_i n_i).
       ``score="paper"`` (default): s_i = 1/log(L_i), the paper's formula. L depends on the covariance's
       scale, i.e. on how much calibration data it sums (the SVD-LLM code sums XᵀX over every calibration
       token), so L is computed at the paper's calibration size whatever ours is: with the covariance per
       token times 256 × 2048 tokens (``PAPER_TOKENS``; the whitened truncation itself does not depend on the
       scale). s_i = 1 where L_i ≤ e (a matrix that loses almost nothing: the most compressible).
       ``score="relative"``: s_i = 1/log(1 + L_i/mean_G L), scale-free but far more spread out (layer 0's
       attention gets ~12× the group's mean ratio on the default model).
       Measured on the default model (`benchmarks/compress.py`, 16 × 128 calibration tokens, single runs,
       held-out perplexity; dense 54.86) at 20 / 40 / 60 % removed: uniform ratios (= SVD-LLM V1) 200.2 /
       486.9 / 1 177, ``paper`` 201.0 / 587.7 / 2 103, ``relative`` 487.8 / 2 689 / 142 462. On this model the
       allocation does not beat uniform ratios, and the relative score is much worse.
       R_i is capped at min(0.99, the ratio of rank 1) and what a capped matrix cannot remove goes to the rest
       of its group (water-filling, :func:`capped_shares`), so each group meets its budget up to the
       rounding of k_i = max(1, ⌊(1 − R_i)mn/(m+n)⌋). (Before this, the capped excess was dropped: 18.5 /
       36.4 / 54.3 % removed for 20 / 40 / 60 % asked on the default model.)
    """

    name = "svd-llm-v2"
    paper = "https://arxiv.org/abs/2503.12340"
    summary = "SVD-LLM V2: eigen-whitening (no Cholesky) + per-matrix ratios from theoretical truncation loss"
    uses_calibration = True
    whitening = True
    needs_spectra = True

    score: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in SCORES:
            raise ValueError(f"svd-llm-v2: score must be one of {SCORES}, got {self.score!r}.")

    def statistic(self) -> InputCovariance:
        return InputCovariance()

    def transform(self, name, weight, stats):
        """Whitening from the per-token covariance ×PAPER_TOKENS (the scale 1/log(L) reads; W' does not depend on it)."""
        C = stats["covariance"].to(weight.device)
        if "sequences" in stats and float(stats["rows"]) > 0:
            C = C * (float(stats["sequences"]) * PAPER_TOKENS / float(stats["rows"]))
        return eigen_whitening(C, name)

    def allocate(self, spectra, shapes):
        groups: dict[str, list[str]] = {}
        for name in shapes:
            groups.setdefault(_INDEX.sub(".*.", "." + name + ".").strip("."), []).append(name)
        ranks: dict[str, int | None] = {}
        for members in groups.values():
            loss = {}
            for name in members:
                m, n = shapes[name]
                k = uniform_rank(m, n, self.ratio)
                loss[name] = float(spectra[name][k:].square().sum().sqrt())
            score = scores(loss, self.score)
            # a ratio may remove at most 99 % of a matrix, and never more than its rank-1 factorization does
            caps = [min(CAP, 1.0 - sum(shapes[n]) / math.prod(shapes[n])) for n in members]
            ratios = capped_shares([score[n] for n in members], [math.prod(shapes[n]) for n in members],
                                   self.ratio, [max(c, 1e-9) for c in caps])
            for name, r in zip(members, ratios):
                m, n = shapes[name]
                top = max_saving_rank(m, n)
                ranks[name] = min(max(uniform_rank(m, n, r), 1), top) if top > 0 else None
        return ranks


def scores(loss: dict[str, float], rule: str) -> dict[str, float]:
    """s_i from the truncation losses L_i of one group: 1/log(max(L_i, e)) (``paper``) or 1/log(1 + L_i/mean L)
    (``relative``; a matrix with zero loss gets twice the largest finite score)."""
    if rule == "paper":
        return {n: 1.0 / math.log(max(l, math.e)) for n, l in loss.items()}
    mean = sum(loss.values()) / len(loss)
    score = {n: 1.0 / math.log1p(l / mean) if mean > 0 and l > 0 else math.inf for n, l in loss.items()}
    finite = [s for s in score.values() if math.isfinite(s)]
    top = 2 * max(finite) if finite else 1.0
    return {n: (s if math.isfinite(s) else top) for n, s in score.items()}
