"""Trainable cores C shared by several methods (the update is s·B C A; see layers.py).

A core is an ``nn.Module`` whose ``forward()`` returns a vector (read as a diagonal) or a matrix. Its
parameters and buffers are exactly the tensors it was built from, so ``save_adapter``/``load_adapter``
round-trip it through the method's ``make_core``. Method-specific cores (SVFT's sparse matrix, SALT's
scale-and-shift, Spectral Adapter's Cayley rotations) live with their methods in ``svdkit/zoo``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Delta(nn.Module):
    """C = value − initial: a trainable vector or matrix, measured from its frozen starting point.

    With ``initial`` the update is zero at init whatever ``value`` starts at (SVFit trains σ from σ₀:
    ΔW = U diag(σ − σ₀) Vᵀ); without it C = value.
    """

    def __init__(self, value: Tensor, initial: Tensor | None = None):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format))
        if initial is not None:
            self.register_buffer("initial", initial.detach().clone(memory_format=torch.contiguous_format))
        else:
            self.initial = None

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "Delta":
        unknown = set(tensors) - {"value", "initial"}
        if "value" not in tensors or unknown:
            raise ValueError(f"a Delta core takes 'value' and optionally 'initial', got {sorted(tensors)}")
        return cls(tensors["value"], tensors.get("initial"))

    def forward(self) -> Tensor:
        return self.value if self.initial is None else self.value - self.initial

    def extra_repr(self) -> str:
        kind = "diagonal" if self.value.ndim == 1 else "matrix"
        return f"{kind} {tuple(self.value.shape)}" + (", from its init" if self.initial is not None else "")


class Fixed(nn.Module):
    """C = value, frozen (a buffer): e.g. Spectral Adapter A's Σ_r between its trainable bases."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.register_buffer("value", value.detach().clone(memory_format=torch.contiguous_format))

    def forward(self) -> Tensor:
        return self.value


class BlockScale(nn.Module):
    """C = diag(value ⊗ 1_block): one trainable scalar per block of ``block`` consecutive components."""

    def __init__(self, value: Tensor, block: int):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format))
        self.block = int(block)

    def forward(self) -> Tensor:
        return self.value.repeat_interleave(self.block)
