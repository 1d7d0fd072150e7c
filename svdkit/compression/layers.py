"""The factored linear that replaces a compressed ``nn.Linear``: y = second(first(x)).

    first:  nn.Linear(n → k, no bias), weight B = Σ_k^{1/2} V_kᵀ S⁻¹   (k × n)
    second: nn.Linear(k → m, bias b),   weight A = U_k Σ_k^{1/2}        (m × k)

Both are plain ``nn.Linear`` modules, so PEFT/svdkit LoRA, quantizers and ``svdkit finetune`` adapt them
like any other linear (``targets="all-linear"`` selects ``….q_proj.first`` and ``….q_proj.second``; SVD-LLM's
LoRA "parameter update" trains exactly these). The dense W' = A·B is never formed in the forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """A rank-``rank`` factorization of an (out × in) linear map; the drop-in for nn.Linear / GPT-2 Conv1D."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):  # fmt: skip
        super().__init__()
        if not 0 < rank:
            raise ValueError(f"LowRankLinear: rank must be positive, got {rank}.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.conv1d = False  # it replaced a GPT-2 Conv1D (the dense export writes that type back)
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, bias: Tensor | None, dtype: torch.dtype) -> "LowRankLinear":
        """The module computing x ↦ A (B x) + bias, stored in ``dtype`` on A's device."""
        (m, k), n = A.shape, B.shape[1]
        layer = cls(n, m, k, bias=bias is not None, dtype=dtype, device=A.device)
        with torch.no_grad():
            layer.first.weight.copy_(B)
            layer.second.weight.copy_(A)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> Tensor:
        """W' = A·B (out × in): only for exporting plain dense weights."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
