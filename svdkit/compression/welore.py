"""``welore``: data-free low-rank decomposition from heavy-tailed spectra (Jaiswal et al., ICML 2025, https://arxiv.org/abs/2407.11239)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdkit.compression.allocation import threshold_ranks
from svdkit.compression.config import CompressConfig
from svdkit.core.registry import register


@register
@dataclass(frozen=True)
class WeLore(CompressConfig):
    """WeLore: one global threshold τ on normalized singular values sets every matrix's rank,

        k_i = #{j : σ_ij/σ_i1 > τ},   W'_i = U_k Σ_k V_kᵀ (plain truncated SVD of W_i),

    with τ the smallest value whose total parameter count fits (1 − ratio)·Σ m·n (the paper picks τ for a
    target reduction, e.g. 0.175 for 50 % on LLaMA-2-7B). Matrices with a heavy-tailed spectrum (fast decay)
    get low ranks and become low-rank components; those whose rank would not save parameters stay dense — the
    paper's split into LRCs and dense, frozen matrices (fine-tune only the LRCs: ``svdkit finetune`` on the
    ``first``/``second`` factors). Data-free: no calibration.
    """

    name = "welore"
    paper = "https://arxiv.org/abs/2407.11239"
    summary = "data-free per-matrix ranks from one threshold on normalized singular values; the rest dense"
    needs_spectra = True

    def allocate(self, spectra, shapes):
        # loss of keeping k = the largest discarded normalized singular value σ_{k+1}/σ_1 (0 once all are kept)
        losses = {n: torch.cat([S.double() / S[0].double().clamp(min=1e-300), S.new_zeros(1, dtype=torch.float64)])
                  for n, S in spectra.items()}  # fmt: skip
        return threshold_ranks(losses, shapes, self.ratio)
