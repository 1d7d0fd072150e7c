"""Trainable cores C shared by several methods (the update is s·B C A; see layers.py).

A core is an ``nn.Module`` whose ``forward()`` returns C densely: a vector (read as a diagonal) or a
matrix, what the dense views (merge, export, ΔW) use. ``structured()`` returns the form the layer's forward
applies to h = A·x without ever building a dense matrix (:func:`apply_core`):

    a vector c       diagonal C:      z = h ⊙ c                      (SVFit, VectorFit, SVFT plain)
    a matrix         dense C:         z = h Cᵀ                       (NLoRA's r×r core, …)
    :class:`Blocks`  blockdiag(C_j):  z_j = h_j C_jᵀ per head (bmm)   (CLOVER)
    :class:`Sparse`  diag(d) + Σ vᵢ e_rowᵢ e_colᵢᵀ: gather/scatter      (SVFT banded/random/top-k)

Its parameters and buffers are exactly the tensors it was built from, so ``save_adapter``/``load_adapter``
round-trip it through the method's ``make_core``. Method-specific cores (SVFT's sparse matrix, SALT's
scale-and-shift, Spectral Adapter's Cayley rotations) live with their methods in ``svdkit/adapters/zoo``.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Blocks:
    """C = blockdiag(blocks[0], …, blocks[h−1]) for an (h, d_out, d_in) stack."""

    blocks: Tensor


@dataclass(frozen=True)
class SparsePlan:
    """The entries of a sparse C in CSR order (row-major: ``order``, ``crow``, ``col``) and in the order of
    Cᵀ's CSR (``t_order`` over the row-major entries, ``t_crow``, ``t_col``): index work done once per core."""

    order: Tensor
    crow: Tensor
    col: Tensor
    t_order: Tensor
    t_crow: Tensor
    t_col: Tensor


def sparse_plan(rows: Tensor, cols: Tensor, size: int) -> SparsePlan:
    order = torch.argsort(rows * size + cols, stable=True)
    r, c = rows[order], cols[order]
    t_order = torch.argsort(c * size + r, stable=True)
    to_csr = torch._convert_indices_from_coo_to_csr
    return SparsePlan(order, to_csr(r, size), c, t_order, to_csr(c[t_order], size), r[t_order])


@dataclass(frozen=True)
class Sparse:
    """C (size × size) = diag(diagonal) + Σᵢ values[i]·e_{rows[i]} e_{cols[i]}ᵀ (repeated positions add up);
    ``diagonal`` None is 0; ``plan`` (:func:`sparse_plan`) is made on the fly when not given."""

    rows: Tensor
    cols: Tensor
    values: Tensor
    size: int
    diagonal: Tensor | None = None
    plan: SparsePlan | None = None


def dense_core(c):
    """C as a tensor the dense views can multiply: a vector (diagonal) or a matrix stays as it is."""
    if isinstance(c, Blocks):
        return torch.block_diag(*c.blocks.unbind(0))
    if isinstance(c, Sparse):
        dense = c.values.new_zeros(c.size, c.size) if c.diagonal is None else torch.diag(c.diagonal)
        return dense.index_put((c.rows, c.cols), c.values, accumulate=True)
    return c


def apply_core(h: Tensor, c) -> Tensor:
    """z = h Cᵀ row-wise for h (..., r_in): what s·B C A x computes between A and B, in C's structure."""
    if isinstance(c, Blocks):  # per head: (…, h, d_in) × (h, d_out, d_in) → (…, h, d_out)
        heads, d_out, d_in = c.blocks.shape
        return torch.einsum("...hi,hoi->...ho", h.unflatten(-1, (heads, d_in)), c.blocks).flatten(-2)
    if isinstance(c, Sparse):
        plan = c.plan or sparse_plan(c.rows, c.cols, c.size)
        z = _SparseCoreFn.apply(h.reshape(-1, h.shape[-1]), c.values, c.diagonal, plan)
        return z.view(*h.shape[:-1], c.size)
    return h * c if c.ndim == 1 else torch.nn.functional.linear(h, c)


def _csr(crow: Tensor, col: Tensor, values: Tensor) -> Tensor:
    size = crow.shape[0] - 1
    with warnings.catch_warnings():  # torch flags its CSR support as beta (the products used here are tested)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, (size, size), check_invariants=False)


class _SparseCoreFn(torch.autograd.Function):
    """z = h ⊙ d + h Mᵀ for a sparse M on 2-D h (T × k), through CSR sparse × dense products on hᵀ.

    Forward zᵀ = M hᵀ (+ d ⊙ hᵀ); backward ∂hᵀ = Mᵀ ∂zᵀ (Cᵀ's CSR from the plan) and ∂vᵢ = ⟨∂zᵀ_{rowᵢ}, hᵀ_{colᵢ}⟩,
    the product ∂zᵀ h sampled at the entries (``torch.sparse.sampled_addmm``). Nothing of size p × T is
    formed (a gather/scatter of rows of hᵀ is ~50× slower for a banded SVFT layer on a CPU), and only hᵀ
    is saved for the backward.
    """

    @staticmethod
    def forward(ctx, h, values, diagonal, plan):
        hT = h.t().contiguous()
        v = values[plan.order]
        zT = _csr(plan.crow, plan.col, v) @ hT
        if diagonal is not None:
            zT.addcmul_(hT, diagonal[:, None])
        ctx.plan = plan
        ctx.save_for_backward(hT, v, diagonal)
        return zT.t()

    @staticmethod
    def backward(ctx, gz):
        hT, v, diagonal = ctx.saved_tensors
        plan = ctx.plan
        need_h, need_v, need_d = ctx.needs_input_grad[:3]
        gzT = gz.t().contiguous()
        gh = gv = gd = None
        if need_v:  # ∂v in CSR order, then back to the caller's order
            sampled = torch.sparse.sampled_addmm(_csr(plan.crow, plan.col, torch.zeros_like(v)), gzT, hT.t(), beta=0.0)
            gv = torch.empty_like(v).index_copy_(0, plan.order, sampled.values())
        if need_d and diagonal is not None:
            gd = (gzT * hT).sum(1)
        if need_h:
            ghT = _csr(plan.t_crow, plan.t_col, v[plan.t_order]) @ gzT
            if diagonal is not None:
                ghT.addcmul_(gzT, diagonal[:, None])
            gh = ghT.t()
        return gh, gv, gd, None


class Core(nn.Module):
    """Base of every core: ``from_tensors`` builds one from its named tensors, checking the names against
    the constructor (so a corrupt or foreign adapter gets a clear error instead of a TypeError).
    ``structured()`` defaults to ``forward()``: a core with a cheaper form (blocks, sparse) overrides it."""

    def structured(self):
        return self()

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


def hold_value(core: nn.Module, value: Tensor, initial: Tensor | None) -> None:
    """Give ``core`` a trainable ``value`` and an optional frozen ``initial`` buffer, as contiguous copies
    (torch's QR returns column-major R: a fresh and a loaded core then take the same kernels, so save/load
    reproduces outputs bit for bit)."""
    core.value = nn.Parameter(value.detach().clone(memory_format=torch.contiguous_format))
    if initial is not None:
        core.register_buffer("initial", initial.detach().clone(memory_format=torch.contiguous_format))
    else:
        core.initial = None


class Delta(Core):
    """C = value − initial: a trainable vector or matrix, measured from its frozen starting point.

    With ``initial`` the update is zero at init whatever ``value`` starts at (SVFit trains σ from σ₀:
    ΔW = U diag(σ − σ₀) Vᵀ); without it C = value.
    """

    def __init__(self, value: Tensor, initial: Tensor | None = None):
        super().__init__()
        hold_value(self, value, initial)

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
