"""CorDA: LoRA on a context-oriented residual (METHODS.md §10).

The SVD is taken of W C̃ (C̃ the damped input covariance of calibration data) instead of W, and the
inverse covariance is folded back into the input-side factor, so the adapter captures the directions
that matter for the calibration data. Covariance math lives in :mod:`svdkit.core.covariance`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.core.covariance import check_covariance, covariance_svd, damped_covariance
from svdkit.adapters.layers import Init
from svdkit.core.linalg import balanced_factors, layer_seed
from svdkit.core.statistics import InputCovariance

_MODES = {"ipa": "top", "kpa": "bottom"}
_PEFT_MODES = {"ipm": "ipa", "kpm": "kpa"}


@register
@dataclass(frozen=True)
class CorDA(AdapterConfig):
    """CorDA (https://arxiv.org/abs/2406.05223): context-oriented decomposition adaptation.

    W C̃ = U Σ V̂ᵀ,  W = U Σ (V̂ᵀC̃⁻¹),  B = U_idx √(Σ_idx/s),  A = √(Σ_idx/s) (V̂ᵀC̃⁻¹)_idx,  W_res = W − s·B A,
    with C = (1/N) Σ_i X̃_iᵀX̃_i over N calibration sequences, X̃_i = X_i / max(X_i) (``svdkit.calibrate``
    measures it: ``InputCovariance(scale="max")``), and C̃ = C + δ·mean(diag C)·I.

    mode:        ``"ipa"`` instruction-previewed adaptation, idx = top-r (calibrate on the fine-tuning
                 task's data); ``"kpa"`` knowledge-preserved adaptation, idx = bottom-r (calibrate on
                 world-knowledge QA such as NQ-open/TriviaQA). PEFT calls them ``"ipm"``/``"kpm"``.
    damping:     the first δ (0.01); it doubles until ‖C̃C̃⁻¹ − I‖_F < ``damping_tol`` (0.05) and C̃ is
                 positive definite (a warning names the layer when δ had to grow).
    Paper defaults: r = 128, lr 2e-5, 256 samples × up to 2048 tokens; here r = α = 16. The adapter is
    function-preserving (the frozen s·B₀A₀ is subtracted) and exports as a rank-2r PEFT LoRA.

    Paper vs code: the paper defines C = XXᵀ; the per-sample division by max(X) and the δ-doubling rule are
    from the official code (and PEFT), followed here. The code divides by |max(X)|; the sign cancels in
    X̃ᵀX̃, so C is the same — it is not max|X|. Deliberate differences from PEFT: the damping test, C̃⁻¹,
    W C̃ and V̂ᵀC̃⁻¹ are computed in float64 (PEFT: float32), so a wide layer whose float32 inverse fails
    PEFT's test at δ = 0.01 keeps δ = 0.01 here (a less damped, equally valid orientation), and C̃ must also
    be positive definite; the SVD of W C̃ runs in ``compute_dtype`` (float32 as PEFT; "float64" for KPA
    on ill-conditioned covariances, whose bottom triplets float32 resolves only to ~1e-7·σ₁). Calibration
    counts only non-padding tokens (PEFT's hook sees every position and needs batches of one sequence).
    ``svd="randomized"`` decomposes W C̃ with the seeded randomized engine.
    """

    mode: str = "ipa"
    damping: float = 0.01
    damping_tol: float = 0.05

    name = "corda"
    lr = 2e-5
    basis = "covariance-oriented SVD of W·C, top-r (IPA) / bottom-r (KPA)"
    trains = "B, A"
    params = "r(m+n)"
    export_rank = "2r (r if B or A frozen)"
    paper = "https://arxiv.org/abs/2406.05223"
    uses_calibration = True
    calibration_samples = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in _MODES:
            hint = f" (PEFT's {self.mode!r} is mode={_PEFT_MODES[self.mode]!r})" if self.mode in _PEFT_MODES else ""
            raise ValueError(f"CorDA: mode must be 'ipa' (top-r) or 'kpa' (bottom-r), got {self.mode!r}{hint}.")
        for field, value in (("damping", self.damping), ("damping_tol", self.damping_tol)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"CorDA: {field} must be a positive number, got {value!r}.")

    def statistic(self) -> InputCovariance:
        """C = (1/N) Σ_i X̃_iᵀX̃_i with X̃_i = X_i / max(X_i), per calibration sequence."""
        return InputCovariance(scale="max")

    def initialize(self, weights, names, calibration=None) -> Init:
        if calibration is None:
            raise ValueError("CorDA needs calibration statistics: stats = svdkit.calibrate(model, batches, cfg), "
                             "then svdkit.adapt(model, cfg, calibration=stats).")  # fmt: skip
        damped, inverse = [], []
        for name in names:
            C = calibration[name]["covariance"].to(weights.device)
            check_covariance(C, weights.shape[-1], name)
            Ct, Ci, _ = damped_covariance(C, name, self.damping, self.damping_tol)
            damped.append(Ct)
            inverse.append(Ci)
        seeds = [layer_seed(self.seed, name) for name in names]
        U, S, Vh = covariance_svd(weights, torch.stack(damped), torch.stack(inverse), self.rank, _MODES[self.mode],
                                  self.svd, seeds, self.niter, self.oversample, self.dtype)  # fmt: skip
        B, A = balanced_factors(U, S, Vh, self.scaling)
        return Init(A=A.to(self.dtype), B=B.to(self.dtype))
