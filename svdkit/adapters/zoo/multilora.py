"""MultiLoRA (Wang et al. 2023, arXiv 2311.11501): n parallel LoRAs with learnable, zero-initialized scales.

ΔW = (α/r)·Σ_{i=1}^{n} s_i B_i A_i, stored as one stacked LoRA: A = [A_1; …; A_n] (n·r × in),
B = [B_1, …, B_n] (out × n·r) and the core C = diag(s ⊗ 1_r) (``cores.BlockScale``), so that
B C A = Σ s_i B_i A_i. The adapted layer's rank is therefore n·r, and it exports as a rank-n·r LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import BlockScale
from svdkit.adapters.layers import Init
from svdkit.core.linalg import kaiming_uniform, layer_generator


@register
@dataclass(frozen=True)
class MultiLoRA(AdapterConfig):
    """MultiLoRA (https://arxiv.org/abs/2311.11501): ΔW = (α/r)·Σᵢ sᵢ Bᵢ Aᵢ over n parallel rank-r LoRAs.

    Init (paper: Kaiming-uniform for both factors, zero-initialized scaling factors): each Aᵢ (r × in) ~
    U(±1/√in), each Bᵢ (out × r) ~ U(±1/√r) (kaiming_uniform(a=√5) of nn.Linear(r, out)), sᵢ = 0, so
    ΔW = 0 at init (the first step moves only the sᵢ; A, B follow once sᵢ ≠ 0). With α = r (the default)
    the fixed factor α/r is 1 and the learned sᵢ carry the scale. Trains n·r(m+n) + n per matrix; exports
    as a rank-n·r LoRA. Defaults: r = α = 16, ``n_loras`` = 3, lr 2e-4 (svdkit's LoRA defaults; the paper's n, r and
    lr were not verifiable here [?]).
    """

    n_loras: int = 3

    name = "multilora"
    basis = "random (kaiming A and B, zero per-LoRA scales)"
    trains = "B, A, s (one scale per LoRA)"
    params = "n·r(m+n) + n"
    export_rank = "n·r"
    paper = "https://arxiv.org/abs/2311.11501"

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.n_loras
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"MultiLoRA: n_loras (the number of parallel LoRAs) must be a positive integer, got {n!r}")

    def initialize(self, weights, names, calibration=None) -> Init:
        b, m, n = weights.shape
        r, k, A, B = self.rank, self.n_loras * self.rank, [], []
        for name in names:
            g = layer_generator(self.seed, name)
            A.append(kaiming_uniform((k, n), n, g, self.dtype))
            B.append(kaiming_uniform((m, k), r, g, self.dtype))
        scales = torch.zeros(b, self.n_loras, dtype=self.dtype)
        device = weights.device
        return Init(A=torch.stack(A).to(device), B=torch.stack(B).to(device), subtract=False,
                    core={"value": scales.to(device)})  # fmt: skip

    def make_core(self, tensors) -> BlockScale:
        return BlockScale.from_tensors(type(self).__name__, tensors, block=self.rank)  # block: this module's r
