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
    Result: ``{"covariance": (n × n) float64, "rows": tokens seen}``.
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
        return {"covariance": state["sum"].div_(state["sequences"].clamp(min=1)), "rows": state["rows"]}  # in place


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
