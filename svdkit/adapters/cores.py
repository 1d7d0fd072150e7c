"""Trainable cores C shared by several methods (the update is s·B C A; see layers.py).

A core is an ``nn.Module`` whose ``forward()`` returns a vector (read as a diagonal) or a matrix. Its
parameters and buffers are exactly the tensors it was built from, so ``save_adapter``/``load_adapter``
round-trip it through the method's ``make_core``. Method-specific cores (SVFT's sparse matrix, SALT's
scale-and-shift, Spectral Adapter's Cayley rotations) live with their methods in ``svdkit/zoo``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


class Core(nn.Module):
    """Base of every core: ``from_tensors`` builds one from its named tensors, checking the names against
    the constructor (so a corrupt or foreign adapter gets a clear error instead of a TypeError)."""

    @classmethod
    def from_tensors(cls, owner: str, tensors: dict[str, Tensor], **extra) -> "Core":
        params = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self" and name not in extra]
        required = [p.name for p in params if p.default is p.empty]
        optional = [p.name for p in params if p.default is not p.empty]
        if not set(required) <= set(tensors) <= set(required) | set(optional):
            more = f" (and optionally {', '.join(map(repr, optional))})" if optional else ""
            raise ValueError(f"{owner} core takes {'' if optional else 'only '}{', '.join(map(repr, required))}{more}, "
                             f"got {sorted(tensors)}.")  # fmt: skip
        return cls(**tensors, **extra)


class Delta(Core):
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

    def forward(self) -> Tensor:
        return self.value if self.initial is None else self.value - self.initial

    def extra_repr(self) -> str:
        kind = "diagonal" if self.value.ndim == 1 else "matrix"
        return f"{kind} {tuple(self.value.shape)}" + (", from its init" if self.initial is not None else "")


class Fixed(Core):
    """C = value, frozen (a buffer): e.g. Spectral Adapter A's Σ_r between its trainable bases."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.register_buffer("value", value.detach().clone(memory_format=torch.contiguous_format))

    def forward(self) -> Tensor:
        return self.value


class BlockScale(Core):
    """C = diag(value ⊗ 1_block): one trainable scalar per block of ``block`` consecutive components."""

    def __init__(self, value: Tensor, block: int):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format))
        self.block = int(block)

    def forward(self) -> Tensor:
        return self.value.repeat_interleave(self.block)
