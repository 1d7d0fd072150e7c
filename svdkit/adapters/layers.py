"""The adapted-layer type shared by every method.

    y = x W₀ᵀ + b + s·B C A·drop(x) − s·B₀ A₀·x          (default, base weight untouched)
    y = x W_resᵀ + b + s·B C A·drop(x),  W_res = W₀ − s·B₀A₀   (``fold=True``)

A (r × in) is the input-side factor and B (out × r) the output side, as PEFT's ``lora_A``/``lora_B``;
either may be absent (the identity). C is an optional trainable *core* between them (a module that
returns a vector, read as a diagonal, or a matrix): singular values (SVFit), a sparse matrix (SVFT), a
Cayley rotation (Spectral Adapter R), an r×r mixing matrix (NLoRA), … Methods differ in how A, C, B are
initialized and which of them train. The frozen B₀, A₀ exist only for methods whose initial update is
non-zero (PiSSA, SORSA, …: B₀ = B·C at init, A₀ = A) or that remove part of the weight by design (KaSA's
truncated tail), so the adapted model computes its function without the original weight ever being
written.

``weightless`` layers compute y = s·B C A x + b from the factors alone: W stays, frozen and unused, so that
``unadapt`` restores it bit-exactly; with ``fold=True`` W is dropped only where the core's ``base()`` lets
s·B·base()·A restore it (SVFT). CLOVER's V·O pair is weightless: v_proj and o_proj are each replaced by
factors that reproduce the original function only jointly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdkit.core.targets import is_conv1d

FACTORS = ("A", "B")


@dataclass
class Init:
    """What a method's ``initialize`` returns for a batch of b same-shaped layers (stacked on dim 0)."""

    A: Tensor | None  # (b, r, n) input side; None: the identity (r = n)
    B: Tensor | None  # (b, m, r) output side; None: the identity (r = m)
    trainable: frozenset = field(default_factory=lambda: frozenset(FACTORS))  # which of A, B train
    subtract: bool = True  # B·C·A ≠ 0 at init: keep B₀ = B·C, A₀ = A so that the init preserves the function
    core: dict = field(default_factory=dict)  # the core's tensors, each (b, ...): the method's ``make_core`` input
    A0: Tensor | None = None  # explicit frozen s·B₀A₀ to subtract (e.g. KaSA's discarded tail); subtract=False
    B0: Tensor | None = None
    bias: bool = False  # train an additive output bias Δb where the base layer has a bias (VectorFit)
    weightless: bool = False  # the forward is s·B C A x + b alone (W kept for unadapt; fold drops it if core.base())

    def layer(self, i: int) -> dict:
        """Layer i's slice of every tensor."""
        pick = lambda t: None if t is None else t[i]  # noqa: E731
        return dict(A=pick(self.A), B=pick(self.B), A0=pick(self.A0), B0=pick(self.B0),
                    core={k: v[i] for k, v in self.core.items()})  # fmt: skip


def weight_matrix(module: nn.Module) -> Tensor:
    """The module's weight as an (out × in) matrix (a transposed view for GPT-2's Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapters of half-precision bases train in fp32 (as PEFT's autocast_adapter_dtype)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def apply_core(B: Tensor | None, c: Tensor | None) -> Tensor | None:
    """B·C for a core value c: a vector (diagonal C) or a matrix; B = None is the identity."""
    if c is None:
        return B
    if c.ndim == 1:
        return torch.diag(c) if B is None else B * c
    return c if B is None else B @ c


class SpectralLinear(nn.Module):
    """A linear (or Conv1D) layer with a spectral adapter (see the module docstring).

    Holds the base module's own ``weight`` and ``bias`` Parameters (so their state-dict keys do not
    change) and keeps the base module object to put back on :func:`svdkit.unadapt`/``merge``.
    """

    def __init__(
        self,
        base: nn.Module,
        A: Tensor | None,
        B: Tensor | None,
        *,
        scaling: float,
        A0: Tensor | None = None,
        B0: Tensor | None = None,
        core: nn.Module | None = None,
        trainable: frozenset = frozenset(FACTORS),
        bias: bool = False,
        weightless: bool = False,
        fold: bool = False,
        dropout: float = 0.0,
        fingerprint: str = "",
    ):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a child: its tensors are ours while adapted
        self.fan_in_fan_out = is_conv1d(base)
        W = weight_matrix(base)
        self.out_features, self.in_features = W.shape
        self.scaling = float(scaling)
        self.fingerprint = fingerprint
        self.trainable = frozenset(trainable)
        # fold: W → W_res = W − s·B₀A₀ (residual methods), or W dropped when s·B·core.base()·A stands for it;
        # a weightless layer whose core has no base() keeps W whatever fold says (unadapt needs it)
        self.weightless = bool(weightless)
        restorable = self.weightless and callable(getattr(core, "base", None))
        self.fold_requested = bool(fold and (A0 is not None or restorable))
        self.folded = False
        self.weight_dtype = W.dtype
        self.bias = base.bias
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = _factor_dtype(W.dtype)

        def own(t: Tensor) -> Tensor:
            return t.detach().to(device=W.device, dtype=dtype).clone(memory_format=torch.contiguous_format)

        for key, value in (("A", A), ("B", B)):
            if value is None:
                setattr(self, f"lora_{key}", None)
            elif key in self.trainable:
                setattr(self, f"lora_{key}", nn.Parameter(own(value)))
            else:
                self.register_buffer(f"lora_{key}", own(value))
        if B is None and core is None:
            raise ValueError("an adapter needs an output factor B or a core")
        if core is not None:
            core = core.to(device=W.device, dtype=dtype)
        self.core = core
        if A0 is not None:
            self.register_buffer("init_A", own(A0))
            self.register_buffer("init_B", own(B0))
        else:
            self.init_A = self.init_B = None
        # Δb only where the base has a bias (a new bias would not survive a merged save_pretrained)
        trains_bias = bias and base.bias is not None
        self.lora_bias = nn.Parameter(torch.zeros(self.out_features, device=W.device, dtype=dtype)) if trains_bias else None
        self.weight = base.weight

    @property
    def rank(self) -> int:
        """Inner dimension r of the update (A's rows; the input size when A is the identity)."""
        return self.lora_A.shape[0] if self.lora_A is not None else self.in_features

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable tensors of this adapter (everything but the base weight and bias)."""
        return [(n, p) for n, p in self.named_parameters() if n not in ("weight", "bias")]

    def output_factor(self) -> Tensor | None:
        """B·C, the output side with the core applied (None: the identity)."""
        return apply_core(self.lora_B, self.core() if self.core is not None else None)

    def fold_base(self) -> None:
        """Replace the weight by W_res = W − s·B₀A₀ (a new tensor; the forward then skips B₀A₀), or drop it
        when the factors and the core's base part represent it (the memory of W is freed if unreferenced)."""
        if self.fold_requested and not self.folded and self.weightless:
            self.base.weight = None
            self.weight = None
            self.folded = True
        elif self.fold_requested and not self.folded:
            W = self._dense()
            with torch.no_grad():
                self._set_weight((W.to(self.init_A.dtype) - self.scaling * (self.init_B @ self.init_A)).to(W.dtype))
            self.folded = True

    def _set_weight(self, matrix: Tensor) -> None:
        """Give this layer and its base a new weight Parameter (never writes into the old tensor)."""
        matrix = matrix.detach()
        param = nn.Parameter((matrix.T if self.fan_in_fan_out else matrix).contiguous(), requires_grad=False)
        self.base.weight = param
        self.weight = param

    def _dense(self) -> Tensor | None:
        if self.weight is None:  # weightless fold: W is s·B·core.base()·A
            return None
        return self.weight.T if self.fan_in_fan_out else self.weight

    # svdkit.adapters_disabled(model) sets this: the layer then computes its original function W x + b
    adapter_disabled: bool = False

    def _original_forward(self, x: Tensor) -> Tensor:
        """W x + b of the module this layer was adapted from: the base module itself (bit-exact) unless folded,
        else with W = W_res + s·B₀A₀ (or s·B·core.base()·A for a dropped weight) rebuilt."""
        if not self.folded:
            return self.base(x)
        return F.linear(x, self.original_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.adapter_disabled:
            return self._original_forward(x)
        W, Bc = self._forward_weight(), self.output_factor()
        subtract = self.init_A is not None and not self.folded
        dtype = Bc.dtype if W is None else W.dtype
        if x.dtype != dtype or Bc.dtype != dtype or torch.is_autocast_enabled(x.device.type):
            out = self._forward_composed(x, Bc, subtract)
        else:
            x2 = x.reshape(-1, self.in_features)
            xd = None if isinstance(self.dropout, nn.Identity) else self.dropout(x2)
            A0, B0 = (self.init_A, self.init_B) if subtract else (None, None)
            out = _AdaptedLinearFn.apply(x2, xd, W, self.bias, self.lora_A, Bc, A0, B0, self.scaling)
            out = out.view(*x.shape[:-1], self.out_features)
        return out if self.lora_bias is None else out + self.lora_bias.to(out.dtype)

    def _forward_composed(self, x: Tensor, Bc: Tensor, subtract: bool) -> Tensor:
        """The same function from stock ops, for mixed dtypes (fp32 factors on a bf16 base) and autocast."""
        out = _base_output(x, self._forward_weight(), self.bias, self.out_features)
        h = self.dropout(x.to(Bc.dtype))
        if self.lora_A is not None:
            h = F.linear(h, self.lora_A)
        delta = F.linear(h, Bc)
        if subtract:
            delta = delta - F.linear(F.linear(x.to(Bc.dtype), self.init_A), self.init_B)
        return out + (self.scaling * delta).to(out.dtype)

    # -- dense views (fp32 or the factor dtype) --------------------------------------------------
    def _update(self, subtract: bool, core: Tensor | None = None) -> Tensor:
        """B C A (− B₀ A₀), unscaled, shape (out, in); ``core`` replaces the core's current value."""
        Bc = self.output_factor() if core is None else apply_core(self.lora_B, core)
        update = Bc if self.lora_A is None else Bc @ self.lora_A
        return update - self.init_B @ self.init_A if subtract else update

    def _in_factors(self) -> bool:
        return self.weightless and self.folded

    def _forward_weight(self) -> Tensor | None:
        """The W of the forward's x Wᵀ term: None for a weightless layer (the factors replace W)."""
        return None if self.weightless else self._dense()

    def delta_weight(self) -> Tensor:
        """ΔW relative to the original weight: s·(B C A − B₀ A₀), shape (out, in); s·B C A − W when weightless."""
        if self._in_factors():
            return self.scaling * (self._update(False) - self._update(False, self.core.base()))
        if self.weightless:
            update = self._update(False)
            return self.scaling * update - self._dense().to(update.dtype)
        return self.scaling * self._update(self.init_A is not None)

    def original_weight(self) -> Tensor:
        """The weight the layer was adapted from: bit-exact unless folded (then W_res + s·B₀A₀, or
        s·B·core.base()·A for a dropped weight)."""
        if self._in_factors():
            return (self.scaling * self._update(False, self.core.base())).to(self.weight_dtype)
        W = self._dense()
        if not self.folded:
            return W
        return (W.to(self.init_A.dtype) + self.scaling * (self.init_B @ self.init_A)).to(W.dtype)

    def merged_weight(self) -> Tensor:
        if self.weightless:  # the factors alone, whether W was dropped or kept
            return (self.scaling * self._update(False)).to(self.weight_dtype)
        W = self._dense()
        update = self._update(self.init_A is not None and not self.folded)  # W_res already lacks s·B₀A₀
        return (W.to(update.dtype) + self.scaling * update).to(W.dtype)

    def merged_bias(self) -> Tensor | None:
        if self.lora_bias is None:
            return self.bias
        b = self.lora_bias.detach() if self.bias is None else self.bias.detach() + self.lora_bias.detach()
        return b.to(self.weight_dtype)

    def extra_repr(self) -> str:
        mode = "folded" if self.folded else ("subtract-init" if self.init_A is not None else "zero-init")
        mode = "weight dropped (in the factors)" if self._in_factors() else mode
        mode = "factors replace the weight (kept for unadapt)" if self.weightless and not self.folded else mode
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
            f"trains={sorted(n for n, _ in self.adapter_parameters())}, {mode}"
        )

    # -- leaving -------------------------------------------------------------------------------
    def restored(self) -> nn.Module:
        """The base module with its original weight (bit-exact unless folded)."""
        if self.folded:
            self._set_weight(self.original_weight())
        return self.base

    def merged(self) -> nn.Module:
        """The base module with the adapter folded into new weight (and bias) Parameters."""
        with torch.no_grad():
            self._set_weight(self.merged_weight())
            if self.lora_bias is not None:
                self.base.bias = nn.Parameter(self.merged_bias(), requires_grad=False)
        return self.base


class _AdaptedLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b + s·(x_d Aᵀ) Bᵀ − s·(x A₀ᵀ) B₀ᵀ on 2-D x, with hand-written backward.

    Stock autograd would allocate the output-sized ΔY, s·ΔY and the sum, and in backward a second
    input-sized gradient to add to gout·W. Here the low-rank terms are accumulated into the output and
    into ∂x in place (``addmm_``), and with no dropout the A and A₀ paths share one GEMM through the
    stacked [A; A₀] (h₀ negated so that the output side is the stacked [B, B₀]). ``xd`` is dropout(x),
    or None for no dropout; A = None is the identity; A₀, B₀ are None when nothing is subtracted; W = None
    when the factors stand for the weight (SVFT with fold=True).
    """

    @staticmethod
    def forward(ctx, x, xd, W, bias, A, B, A0, B0, s):
        out = _base_output(x, W, bias, B.shape[0])
        joint = A0 is not None and xd is None and A is not None
        if joint:  # h = [x Aᵀ, −x A₀ᵀ]:  out += s·h [B, B₀]ᵀ
            r = A.shape[0]
            h = x @ torch.cat([A, A0]).T
            h[:, r:].neg_()
            out.addmm_(h, torch.cat([B, B0], dim=1).T, alpha=s)
        else:
            src = x if xd is None else xd
            h = src if A is None else src @ A.T
            out.addmm_(h, B.T, alpha=s)
            if A0 is not None:
                out.addmm_(x @ A0.T, B0.T, alpha=-s)
        ctx.s, ctx.joint = s, joint
        ctx.save_for_backward(x, xd, W, A, B, A0, B0, h)
        return out

    @staticmethod
    def backward(ctx, gout):
        x, xd, W, A, B, A0, B0, h = ctx.saved_tensors
        need_x, need_xd, need_W, need_b, need_A, need_B = ctx.needs_input_grad[:6]
        s, r = ctx.s, B.shape[1]
        src = x if xd is None else xd
        gx = gxd = None
        if ctx.joint:
            G = gout @ torch.cat([B, B0], dim=1)  # (n, 2r); ∂h = s·G, and h₀ was negated
            G1 = G[:, :r]
            gA = s * (G1.T @ x) if need_A else None
            if need_x:
                G[:, r:].neg_()
                gx = _grad_input(gout, W, x).addmm_(G, torch.cat([A, A0]), alpha=s)
        else:
            G1 = gout @ B
            gA = s * (G1.T @ src) if need_A else None
            if need_x:
                gx = _grad_input(gout, W, x)
                if xd is None:
                    gx.addmm_(G1, A, alpha=s) if A is not None else gx.add_(G1, alpha=s)
                if A0 is not None:
                    gx.addmm_(gout @ B0, A0, alpha=-s)
            if need_xd and xd is not None:
                gxd = s * (G1 @ A) if A is not None else s * G1
        gB = s * (gout.T @ h[:, :r]) if need_B else None
        gW = gout.T @ x if need_W else None
        gb = gout.sum(0) if need_b else None
        return gx, gxd, gW, gb, gA, gB, None, None, None


def _base_output(x: Tensor, W: Tensor | None, bias: Tensor | None, out_features: int) -> Tensor:
    """x Wᵀ + b as a fresh tensor the low-rank terms can be accumulated into (b alone when W is None)."""
    if W is not None:
        return F.linear(x, W, bias)
    out = x.new_zeros(*x.shape[:-1], out_features)
    return out if bias is None else out.add_(bias)


def _grad_input(gout: Tensor, W: Tensor | None, x: Tensor) -> Tensor:
    return gout @ W if W is not None else torch.zeros_like(x)

