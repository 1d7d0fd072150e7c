"""BA-LoRA: PiSSA's principal-component init plus three regularizers on the model's outputs.

The outputs Z (n × d) are what the task loss scores: in svdkit's training loop and its Trainer integration,
the logits at the n positions whose next token is labelled (d = vocabulary size), one row per position.
The frozen original model's logits Z₀ on the same batch come from one extra no-grad forward with the
adapters disabled (``svdkit.output_regularization``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from svdkit.adapters.config import AdapterConfig
from svdkit.adapters.layers import Init
from svdkit.core.registry import register
from svdkit.adapters.zoo.residual import PiSSA, residual_init

DIVERSITY = ("covariance", "entropy")


def consistency_kl(outputs: torch.Tensor, base_outputs: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ²·mean over rows of KL(softmax(Z₀/τ) ‖ softmax(Z/τ)): the frozen model's distribution is the target."""
    log_p = F.log_softmax(outputs.float() / temperature, dim=-1)
    log_p0 = F.log_softmax(base_outputs.float() / temperature, dim=-1)
    kl = (log_p0.exp() * (log_p0 - log_p)).sum(-1)
    return temperature**2 * kl.mean()


def covariance_penalty(outputs: torch.Tensor) -> torch.Tensor:
    """Mean square of the off-diagonal entries of C = Z_cᵀZ_c/(n−1), Z_c = Z − mean over rows (d × d).

    For d > n (logits over a vocabulary) C is never formed: ‖C‖_F² = ‖Z_c Z_cᵀ‖_F²/(n−1)² and
    C_ii = Σ_t Z_c[t,i]²/(n−1).
    """
    Z = outputs.float()
    n, d = Z.shape
    if n < 2 or d < 2:
        return Z.new_zeros(())
    Zc = Z - Z.mean(0, keepdim=True)
    if d <= n:
        C = Zc.T @ Zc / (n - 1)
        total = C.square().sum()
    else:
        total = (Zc @ Zc.T).square().sum() / (n - 1) ** 2
    diag = Zc.square().sum(0) / (n - 1)
    return (total - diag.square().sum()) / (d * (d - 1))


def negative_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """−mean over rows of H(softmax(Z_t)) (minimizing it spreads each token distribution)."""
    log_p = F.log_softmax(outputs.float(), dim=-1)
    return (log_p.exp() * log_p).sum(-1).mean()


def top_singular_share(outputs: torch.Tensor, k: int) -> torch.Tensor:
    """−Σ_{i≤k} σ_i(Z) / Σ_i σ_i(Z): minimizing it concentrates the outputs' energy in k directions."""
    sigma = torch.linalg.svdvals(outputs.float())
    return -sigma[:k].sum() / sigma.sum().clamp_min(torch.finfo(sigma.dtype).tiny)


@register
@dataclass(frozen=True)
class BALoRA(AdapterConfig):
    """BA-LoRA (https://arxiv.org/abs/2408.04556): PiSSA plus consistency, diversity and SVD regularizers.

    W = W_res + s·B A initialized as PiSSA (top-r); loss = task + λ₁·L_CR + λ₂·L_DR + λ₃·L_SVD on the logits
    Z (n × V) at the labelled positions and the frozen original model's Z₀:
      L_CR  = τ²·mean_t KL(softmax(Z₀_t/τ) ‖ softmax(Z_t/τ))       (the paper's causal-LM/NLG form; its NLU
              form, a normalized MSE between the two outputs, is not implemented)
      L_DR  = 1/(V(V−1)) Σ_{i≠j} C_ij²,  C = cov of the rows of Z  (``diversity="covariance"``), or
              −mean_t H(softmax(Z_t))                                (``diversity="entropy"``)
      L_SVD = −Σ_{i≤k} σ_i(Z) / Σ_i σ_i(Z)
    Defaults λ₁ = 0.025, λ₂ = λ₃ = 0.005, τ = 2, k = 10 (the official repository's LLaMA-2-7B NLG setting);
    r = α = 16, lr 2e-5 as PiSSA. Trainable r(m+n) per matrix; exported as a rank-2r LoRA (PiSSA's).
    Choices: the covariance penalty is averaged over the V(V−1) off-diagonal entries (not summed) so that
    λ₂ does not scale with the vocabulary; the official NLG code replaces it by the (top-20) token entropy,
    available here as ``diversity="entropy"`` over the whole vocabulary. The code's λ schedules (cosine decay
    of λ₁ to λ₁/10; λ₂, λ₃ off for the first 20% of steps, then ramped up over 5%) and its Frobenius-norm
    denominator for L_SVD are not applied. With micro-batches each regularizer is computed per micro-batch
    and averaged. A weight of 0 switches its term off; with λ₁ = 0 no extra forward is run.
    """

    lambda_consistency: float = 0.025
    lambda_diversity: float = 0.005
    lambda_svd: float = 0.005
    temperature: float = 2.0
    svd_k: int = 10
    diversity: str = "covariance"

    name = "ba-lora"
    paper = "https://arxiv.org/abs/2408.04556"
    lr = PiSSA.lr  # PiSSA's init, so PiSSA's learning rate and description
    basis, trains, params, export_rank = PiSSA.basis, PiSSA.trains, PiSSA.params, PiSSA.export_rank

    def initialize(self, weights, names, calibration=None) -> Init:
        return residual_init(self, weights, names, "top")  # PiSSA's R(W, top-r, s)

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        for key in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{cls}: {key} must be a number >= 0 (0 switches the term off), got {value!r}.")
        tau = self.temperature
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
            raise ValueError(f"{cls}: temperature must be a positive number, got {self.temperature!r}.")
        if isinstance(self.svd_k, bool) or not isinstance(self.svd_k, int) or self.svd_k < 1:
            raise ValueError(f"{cls}: svd_k must be a positive integer, got {self.svd_k!r}.")
        if self.diversity not in DIVERSITY:
            raise ValueError(f"{cls}: diversity must be one of {DIVERSITY}, got {self.diversity!r}.")

    @property
    def uses_outputs(self) -> bool:  # all weights 0: exactly PiSSA, at PiSSA's cost
        return any(w > 0 for w in (self.lambda_consistency, self.lambda_diversity, self.lambda_svd))

    @property
    def needs_base_outputs(self) -> bool:
        return self.lambda_consistency > 0

    def output_regularizer(self, outputs: torch.Tensor, base_outputs: torch.Tensor | None) -> torch.Tensor | None:
        if outputs.ndim != 2:
            raise ValueError(f"{type(self).__name__}: outputs must be a (positions, vocabulary) matrix of logits, "
                             f"got shape {tuple(outputs.shape)}.")  # fmt: skip
        if outputs.shape[0] == 0:
            return None
        total = outputs.new_zeros((), dtype=torch.float32)
        if self.lambda_consistency > 0:
            if base_outputs is None or base_outputs.shape != outputs.shape:
                got = None if base_outputs is None else tuple(base_outputs.shape)
                raise ValueError(f"{type(self).__name__}: the consistency term needs the frozen model's outputs of "
                                 f"shape {tuple(outputs.shape)}, got {got}.")  # fmt: skip
            total = total + self.lambda_consistency * consistency_kl(outputs, base_outputs, self.temperature)
        if self.lambda_diversity > 0:
            term = covariance_penalty(outputs) if self.diversity == "covariance" else negative_entropy(outputs)
            total = total + self.lambda_diversity * term
        if self.lambda_svd > 0:
            total = total + self.lambda_svd * top_singular_share(outputs, self.svd_k)
        return total
