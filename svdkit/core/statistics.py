"""The calibration statistics shared by data-aware methods (see :mod:`svdkit.core.calibration`).

Method-specific ones (EVA's incremental PCA) live with their method.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from svdkit.core.calibration import Statistic


@dataclass(frozen=True)
class InputCovariance(Statistic):
    """C = (1/N) Σ_i X̃_iᵀ X̃_i over the N calibration sequences (X_i: a sequence's input rows, tokens × n).

    scale ``"max"`` divides each sequence's rows by max(X_i) (the maximum, not max |X|) first, as CorDA does
    (https://arxiv.org/abs/2406.05223); ``"none"`` uses them as they are. Sums in float64.
    Result: ``{"covariance": (n × n) float64, "rows": tokens seen, "sequences": N}``.
    """

    scale: str = "none"
    kind = "covariance"

    def __post_init__(self):
        if self.scale not in ("none", "max"):
            raise ValueError(f"InputCovariance: scale must be 'none' or 'max', got {self.scale!r}.")

    def start(self, n_in, m_out, device):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return {"sum": z(n_in, n_in), "sequences": z(()), "rows": z(())}

    def update(self, state, x, counts):
        if self.scale == "max":
            seq = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts.to(x.device))
            peak = torch.full((len(counts),), float("-inf"), device=x.device, dtype=x.dtype)
            peak = peak.scatter_reduce(0, seq, x.amax(dim=1), reduce="amax")
            peak = torch.where(peak == 0, torch.ones_like(peak), peak)
            x = x / peak[seq].unsqueeze(1)
        state["sum"] += (x.T @ x).to(state["sum"].device, torch.float64)
        state["sequences"] += int((counts > 0).sum())
        state["rows"] += x.shape[0]

    def finish(self, state):
        n = state["sum"].shape[0]
        if 0 < state["rows"] < n:
            warnings.warn(f"{int(state['rows'])} calibration tokens for {n} input features: the covariance is "
                          "rank-deficient (it will be damped); pass more calibration samples.", stacklevel=2)  # fmt: skip
        return {"covariance": state["sum"].div_(state["sequences"].clamp(min=1)), "rows": state["rows"],
                "sequences": state["sequences"]}  # in place


@dataclass(frozen=True)
class MeanGradient(Statistic):
    """G = (1/K) Σ_k ∂L_k/∂W: the full gradient of each target weight (m × n), averaged over the K calibration
    batches, fp32 — the one-step full-fine-tuning direction of LoRA-One / LoRA-GA."""

    kind = "gradient"
    needs_grad = True

    def start(self, n_in, m_out, device):
        return {"sum": torch.zeros(m_out, n_in, dtype=torch.float32, device=device), "batches": torch.zeros((), device=device)}

    def update(self, state, x: Tensor, counts):
        state["sum"] += x
        state["batches"] += 1

    def finish(self, state):
        return {"gradient": state["sum"] / state["batches"].clamp(min=1)}


@dataclass(frozen=True)
class InputAbsMean(Statistic):
    """ASVD's activation scale (https://arxiv.org/abs/2312.05821): a_j = (1/K) Σ_k mean_tokens |x_kj| over the K
    calibration sequences, per input channel j (the code sums per-batch token means; here per sequence, so
    batching does not change it). Result: ``{"abs_mean": (n,) float64}``."""

    kind = "abs-mean"

    def start(self, n_in, m_out, device):
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return {"sum": z(n_in), "sequences": z(())}

    def update(self, state, x, counts):
        seq = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts.to(x.device))
        sums = torch.zeros(len(counts), x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, seq, x.abs().double())
        keep = counts > 0
        state["sum"] += (sums[keep] / counts[keep].to(sums).unsqueeze(1)).sum(0).to(state["sum"].device)
        state["sequences"] += int(keep.sum())

    def finish(self, state):
        return {"abs_mean": state["sum"] / state["sequences"].clamp(min=1)}


@dataclass(frozen=True)
class GradientSquares(Statistic):
    """Fisher information of each input column j of W (m × n): F_j = (1/K) Σ_k Σ_i (∂L_k/∂W_ij)², the batch-
    gradient estimate FWSVD (https://arxiv.org/abs/2207.00112) and ASVD's Fisher option use (the paper's
    row importance in the in × out convention). Result: ``{"fisher": (n,) float64}``."""

    kind = "gradient-squares"
    needs_grad = True

    def start(self, n_in, m_out, device):
        return {"sum": torch.zeros(n_in, dtype=torch.float64, device=device), "batches": torch.zeros((), device=device)}

    def update(self, state, x: Tensor, counts):
        state["sum"] += x.double().square().sum(0).to(state["sum"].device)
        state["batches"] += 1

    def finish(self, state):
        return {"fisher": state["sum"] / state["batches"].clamp(min=1)}
