"""Sparse Spectral Training (SST; Zhao et al. 2024, https://arxiv.org/abs/2405.15481): train each target
linear in its SVD form W = U diag(σ) Vᵀ, updating every singular value each step but only a σ-weighted sample
of singular vectors per round, with a re-SVD between rounds.

Choices (as read from the paper; each stated):
- The full spectrum is kept (k = min(m, n) triplets), so W stays full-rank; ``rank`` r is the number of
  singular-vector pairs that train in a round. At the start of each round of ``update_gap`` steps, r indices are
  drawn without replacement with probability ∝ σ_i (seeded per layer and round) and marked in the layer's
  boolean ``active`` buffer (saved with the model, so a resumed run keeps its round).
- "Enhanced gradient": the gradients of u_i and v_i are divided by σ_i (floored at 1e-3·σ_max), i.e. they are
  ∂L/∂W · v_i and (∂L/∂W)ᵀ u_i, so small-σ directions still move. σ gets its plain gradient.
- Between rounds, W is recomposed and decomposed again (exact SVD, sign-fixed) so U and V stay orthonormal,
  and the Adam moments of U, σ, V restart (their coordinates changed). The re-SVD runs right after the last
  update of a round, so the next round's gradients are taken at the new factors (re-decomposing at the start
  of a step would apply gradients taken at the old U, V to the new ones).
- The optimizer is torch's AdamW for everything (embeddings, norms, σ, the sampled vectors); the unsampled
  columns of U and V are restored after each step, so neither momentum nor weight decay moves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from svdkit.core import linalg
from svdkit.core.registry import config_to_dict, register


class SSTLinear(nn.Module):
    """y = x (U diag(σ) Vᵀ)ᵀ + b, initialized to the exact SVD of ``linear``'s weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        W = linear.weight.detach()
        U, S, Vh = linalg.svd_exact(W, min(W.shape))
        self.U, self.S, self.V = (nn.Parameter(t.to(W.dtype).contiguous()) for t in (U, S, Vh.T))
        self.bias = linear.bias
        self.register_buffer("active", torch.ones(S.numel(), dtype=torch.bool))  # the vectors training this round
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def weight(self) -> torch.Tensor:
        return (self.U * self.S) @ self.V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def resample(self, rank: int, seed: int) -> None:
        p = self.S.detach().abs().float() + 1e-12
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.multinomial(p.cpu(), min(rank, p.numel()), generator=gen)
        self.active.zero_()
        self.active[chosen.to(self.active.device)] = True

    @torch.no_grad()
    def resvd(self) -> None:
        U, S, Vh = linalg.svd_exact(self.weight.float(), self.S.numel())
        self.U.copy_(U)
        self.S.copy_(S)
        self.V.copy_(Vh.T)


class SSTAdamW(torch.optim.AdamW):
    """AdamW with SST's round structure (see the module docstring); the step counter is ``sst_step`` in the
    first param group, so it is saved and restored with the optimizer state."""

    def __init__(self, params, layers: list[tuple[str, SSTLinear]], rank: int, update_gap: int, seed: int, **kwargs):
        super().__init__(params, **kwargs)
        self.layers, self.rank, self.update_gap, self.seed = layers, rank, update_gap, seed
        self.param_groups[0].setdefault("sst_step", 0)

    @torch.no_grad()
    def step(self, closure=None):
        t = self.param_groups[0]["sst_step"]
        if t % self.update_gap == 0:
            for name, layer in self.layers:
                layer.resample(self.rank, linalg.layer_seed(self.seed, f"{name}:{t // self.update_gap}"))
        frozen = []
        for _, layer in self.layers:
            off = ~layer.active
            scale = layer.S.abs().clamp_min(1e-3 * float(layer.S.abs().max()))
            for p in (layer.U, layer.V):
                grad = p.grad
                if grad is not None:  # the enhanced, masked gradient replaces p.grad for this step only
                    p.grad = (grad / scale).masked_fill_(off, 0)
                frozen.append((p, p[:, off].clone(), off, grad))
        loss = super().step(closure)
        for p, values, off, grad in frozen:
            p[:, off] = values
            p.grad = grad
        if (t + 1) % self.update_gap == 0:  # the round ends: re-decompose, restart the moments
            for _, layer in self.layers:
                layer.resvd()
                for p in (layer.U, layer.S, layer.V):
                    self.state[p] = {}
        self.param_groups[0]["sst_step"] = t + 1
        return loss


def target_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear except the output head (and any linear sharing the input embedding's weight)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@register
@dataclass(frozen=True)
class SST:
    """Sparse Spectral Training (https://arxiv.org/abs/2405.15481): see :mod:`svdkit.optim.sst`."""

    kind: ClassVar[str] = "optim"
    name: ClassVar[str] = "sst"
    paper: ClassVar[str] = "https://arxiv.org/abs/2405.15481"
    summary: ClassVar[str] = "train W = U diag(σ) Vᵀ: all σ, a σ-weighted sample of singular vectors per round, re-SVD between rounds"
    default_lr: ClassVar[float] = 3e-3
    parametrizes: ClassVar[bool] = True

    rank: int = 128
    update_gap: int = 200
    weight_decay: float = 0.0
    seed: int = 0

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def parametrize(self, model: nn.Module) -> nn.Module:
        for name, linear in target_linears(model):
            swap(model, name, SSTLinear(linear))
        return model

    def make_for(self, model: nn.Module, lr: float) -> SSTAdamW:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SSTLinear)]
        if not layers:
            raise ValueError("SST: the model has no SST layers; call svdkit.optim.parametrize(model, cfg) first.")
        params = [p for p in model.parameters() if p.requires_grad]
        return SSTAdamW(params, layers, self.rank, self.update_gap, self.seed, lr=lr, weight_decay=self.weight_decay)
