"""The adapted-layer type shared by every method.

A (r × in) is the input-side factor and B (out × r) the output side, as PEFT's ``lora_A``/``lora_B``;
either may be absent (the identity). C is an optional trainable *core* between them (see cores.py: a
diagonal, a dense matrix, per-head blocks or a sparse matrix): singular values (SVFit), a sparse matrix
(SVFT), a Cayley rotation (Spectral Adapter R), an r×r mixing matrix (NLoRA), per-head cores (CLOVER), …
Methods differ in how A, C, B are initialized and which of them train. A layer computes one of five
forms, its :class:`Mode`, fixed by the method's :class:`Init` and the config's ``fold``:

    ADD           y = x Wᵀ + b + s·B C A·drop(x)                       the update is zero at init (LoRA)
    SUBTRACT      y = x Wᵀ + b + s·B C A·drop(x) − s·B₀A₀·x            W untouched (PiSSA, KaSA's tail)
    RESIDUAL      y = x W_resᵀ + b + s·B C A·drop(x), W_res = W − s·B₀A₀  SUBTRACT with ``fold=True``
    FACTORS       y = b + s·B C A·drop(x)                              W kept, frozen and unused (SVFT, CLOVER V·O)
    FACTORS_ONLY  FACTORS with W dropped: s·B·core.base()·A stands for it   FACTORS with ``fold=True`` (SVFT)

The frozen B₀, A₀ exist only in SUBTRACT/RESIDUAL: B₀ = B·C at init, A₀ = A for methods whose initial
update is non-zero, or a part of the weight removed by design (KaSA), so the adapted model computes its
function without the original weight ever being written. FACTORS keeps W so that ``unadapt`` restores it
bit-exactly; it is dropped (FACTORS_ONLY) only where the core's ``base()`` lets s·B·base()·A rebuild it.

A layer also carries its method's training-time state (AdaLoRA's EMAs and masks, VectorFit's frozen
vectors) in ``method_state``: non-persistent buffers, so adapter files hold the adapter only while
``svdkit.training_state(model)`` gives checkpoints everything a resumed run needs.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from svdkit.adapters.cores import apply_core, dense_core
from svdkit.adapters import fusion
from svdkit.adapters.fused import AdaptedLinearFn, base_output
from svdkit.core.targets import is_conv1d

FACTORS = ("A", "B")


class Mode(enum.Enum):
    """How an adapted layer computes its output (see the module docstring)."""

    ADD = "add"
    SUBTRACT = "subtract"
    RESIDUAL = "residual"
    FACTORS = "factors"
    FACTORS_ONLY = "factors-only"

    @classmethod
    def of(cls, weightless: bool, subtract: bool) -> "Mode":
        """The unfolded mode of an Init (or a saved adapter): FACTORS, SUBTRACT (frozen B₀A₀) or ADD."""
        return cls.FACTORS if weightless else cls.SUBTRACT if subtract else cls.ADD

    @property
    def uses_weight(self) -> bool:
        """Whether the forward multiplies by W (or W_res)."""
        return self in (Mode.ADD, Mode.SUBTRACT, Mode.RESIDUAL)

    @property
    def folded(self) -> bool:
        return self in (Mode.RESIDUAL, Mode.FACTORS_ONLY)

    def fold(self, restorable: bool) -> "Mode":
        """The mode ``fold=True`` turns this one into (itself where there is nothing to fold)."""
        if self is Mode.SUBTRACT:
            return Mode.RESIDUAL
        return Mode.FACTORS_ONLY if self is Mode.FACTORS and restorable else self


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
    weightless: bool = False  # Mode.FACTORS: the forward is s·B C A x + b alone (W kept for unadapt)

    @property
    def mode(self) -> Mode:
        """The layers' mode before ``fold``."""
        return Mode.of(self.weightless, self.subtract or self.A0 is not None)

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


def output_side(B: Tensor | None, c) -> Tensor | None:
    """B·C for a core value c (any structure of cores.py, made dense); B = None is the identity."""
    if c is None:
        return B
    c = dense_core(c)
    if c.ndim == 1:
        return torch.diag(c) if B is None else B * c
    return c if B is None else B @ c


class MethodState(nn.Module):
    """A method's training-time state for one layer, as non-persistent buffers (moved by ``.to``, left out
    of the adapter's state_dict); ``svdkit.training_state`` / ``load_training_state`` save and restore it."""

    def get(self, key: str) -> Tensor | None:
        return self._buffers.get(key)

    def set(self, key: str, value: Tensor) -> None:
        if key in self._buffers:
            self._buffers[key] = value
        else:
            self.register_buffer(key, value, persistent=False)

    def pop(self, key: str) -> Tensor | None:
        self._non_persistent_buffers_set.discard(key)
        return self._buffers.pop(key, None)

    def clear(self) -> None:
        self._buffers.clear()
        self._non_persistent_buffers_set.clear()

    def tensors(self) -> dict[str, Tensor]:
        return dict(self._buffers)


class SpectralLinear(nn.Module):
    """A linear (or Conv1D) layer with a spectral adapter (see the module docstring).

    Holds the base module's own ``weight`` and ``bias`` Parameters (so their state-dict keys do not
    change) and keeps the base module object to put back on :func:`svdkit.unadapt`/``merge``. ``mode`` is
    the unfolded mode (ADD, SUBTRACT: A0/B0 given, or FACTORS; None: SUBTRACT if A0/B0 are given, else
    ADD); ``fold=True`` moves it to RESIDUAL or
    FACTORS_ONLY when :meth:`fold_base` runs (``svdkit.adapt`` calls it once every layer is built).
    """

    def __init__(
        self,
        base: nn.Module,
        A: Tensor | None,
        B: Tensor | None,
        *,
        scaling: float,
        mode: Mode | None = None,
        A0: Tensor | None = None,
        B0: Tensor | None = None,
        core: nn.Module | None = None,
        trainable: frozenset = frozenset(FACTORS),
        bias: bool = False,
        fold: bool = False,
        dropout: float = 0.0,
        fingerprint: str = "",
    ):
        super().__init__()
        mode = mode or (Mode.SUBTRACT if A0 is not None else Mode.ADD)
        if mode.folded:
            raise ValueError(f"SpectralLinear is built in its unfolded mode (add, subtract, factors), got {mode.value!r}; "
                             "pass fold=True to fold it.")  # fmt: skip
        if (mode is Mode.SUBTRACT) != (A0 is not None and B0 is not None):
            raise ValueError(f"mode {mode.value!r} {'needs' if mode is Mode.SUBTRACT else 'takes no'} frozen initial "
                             "factors A0, B0.")  # fmt: skip
        if B is None and core is None:
            raise ValueError("an adapter needs an output factor B or a core")
        object.__setattr__(self, "base", base)  # not a child: its tensors are ours while adapted
        self.fan_in_fan_out = is_conv1d(base)
        W = weight_matrix(base)
        self.out_features, self.in_features = W.shape
        self.scaling = float(scaling)
        self.fingerprint = fingerprint
        self.trainable = frozenset(trainable)
        self.mode = mode
        self.fold_to = mode.fold(callable(getattr(core, "base", None))) if fold else mode
        self.weight_dtype = W.dtype
        self.bias = base.bias
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.factor_dtype = dtype = _factor_dtype(W.dtype)

        def own(t: Tensor) -> Tensor:
            return t.detach().to(device=W.device, dtype=dtype).clone(memory_format=torch.contiguous_format)

        for key, value in (("A", A), ("B", B)):
            if value is None:
                setattr(self, f"lora_{key}", None)
            elif key in self.trainable:
                setattr(self, f"lora_{key}", nn.Parameter(own(value)))
            else:
                self.register_buffer(f"lora_{key}", own(value))
        self.core = None if core is None else core.to(device=W.device, dtype=dtype)
        if A0 is not None:
            self.register_buffer("init_A", own(A0))
            self.register_buffer("init_B", own(B0))
        else:
            self.init_A = self.init_B = None
        # Δb only where the base has a bias (a new bias would not survive a merged save_pretrained)
        trains_bias = bias and base.bias is not None
        self.lora_bias = nn.Parameter(torch.zeros(self.out_features, device=W.device, dtype=dtype)) if trains_bias else None
        self.weight = base.weight
        self.method_state = MethodState()
        self.input_fusion = fusion.FusionSlot()  # its input-fusion group, once observed (fusion.py)

    @property
    def folded(self) -> bool:
        return self.mode.folded

    @property
    def weightless(self) -> bool:
        """The factors replace W in the forward (FACTORS, FACTORS_ONLY)."""
        return not self.mode.uses_weight

    @property
    def rank(self) -> int:
        """Inner dimension r of the update (A's rows; the input size when A is the identity)."""
        return self.lora_A.shape[0] if self.lora_A is not None else self.in_features

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable tensors of this adapter (everything but the base weight and bias)."""
        return [(n, p) for n, p in self.named_parameters() if n not in ("weight", "bias")]

    def output_factor(self) -> Tensor | None:
        """B·C, the output side with the core applied densely (None: the identity)."""
        return output_side(self.lora_B, self.core() if self.core is not None else None)

    def fold_base(self) -> None:
        """Move to the folded mode: W → W_res = W − s·B₀A₀ (a new tensor; RESIDUAL), or W dropped where the
        factors and the core's base part represent it (FACTORS_ONLY; its memory is freed if unreferenced)."""
        if self.mode is self.fold_to:
            return
        if self.fold_to is Mode.FACTORS_ONLY:
            self.base.weight = None
            self.weight = None
        else:
            W = self._dense()
            with torch.no_grad():
                self._set_weight((W.to(self.init_A.dtype) - self.scaling * (self.init_B @ self.init_A)).to(W.dtype))
        self.mode = self.fold_to

    def _set_weight(self, matrix: Tensor) -> None:
        """Give this layer and its base a new weight Parameter (never writes into the old tensor)."""
        matrix = matrix.detach()
        param = nn.Parameter((matrix.T if self.fan_in_fan_out else matrix).contiguous(), requires_grad=False)
        self.base.weight = param
        self.weight = param

    def _dense(self) -> Tensor | None:
        if self.weight is None:  # FACTORS_ONLY: W is s·B·core.base()·A
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

    # -- forward ------------------------------------------------------------------------------------
    # Input fusion (fusion.py): layers reading one input tensor (q/k/v, gate/up) run as one autograd node.
    # Default on (the same function, fewer skinny GEMMs); off: svdkit.fuse_shared_inputs(model, False).
    fuse_inputs: bool = False  # svdkit.fuse_shared_inputs(model, True) opts in (adapters/fusion.py)

    def forward(self, x: Tensor) -> Tensor:
        if self.adapter_disabled:
            return self._original_forward(x)
        c = None if self.core is None else getattr(self.core, "structured", self.core)()
        ops = self._operands(x, c)
        if ops is None:
            out = self._forward_composed(x, c)
        else:
            x2 = x.reshape(-1, self.in_features)
            if self.fuse_inputs and self._shares_input() and not torch.compiler.is_compiling():
                out = fusion.forward(self, x, x2, ops)
            else:
                xd = None if isinstance(self.dropout, nn.Identity) else self.dropout(x2)
                out = AdaptedLinearFn.apply(x2, xd, *ops)
            out = out.view(*x.shape[:-1], self.out_features)
        return out if self.lora_bias is None else out + self.lora_bias.to(out.dtype)

    def _operands(self, x: Tensor, c) -> tuple | None:
        """(W, bias, A, B·C, A0, B0, s) for the fused functions, or None for the composed path. The fused
        functions take the output side B·C as one matrix: worth it when B trains anyway (or there is no
        core); a core between frozen bases is applied to A·x in its own structure instead."""
        if not (c is None or (isinstance(c, Tensor) and "B" in self.trainable and self.lora_B is not None)):
            return None
        W = self._dense() if self.mode.uses_weight else None
        Bc = output_side(self.lora_B, c)
        if x.dtype != Bc.dtype or (W is not None and W.dtype != Bc.dtype) or x.device != Bc.device \
                or torch.is_autocast_enabled(x.device.type):
            return None
        A0, B0 = (self.init_A, self.init_B) if self.mode is Mode.SUBTRACT else (None, None)
        return W, self.bias, self.lora_A, Bc, A0, B0, self.scaling

    def _shares_input(self) -> bool:
        return self.lora_A is not None and isinstance(self.dropout, nn.Identity)

    def fusable_operands(self, x: Tensor) -> tuple | None:
        """This layer's operands for an input-fusion group computing on x, or None if it cannot join."""
        if self.adapter_disabled or not self.fuse_inputs or not self._shares_input():
            return None
        return self._operands(x, None if self.core is None else getattr(self.core, "structured", self.core)())

    def _forward_composed(self, x: Tensor, c) -> Tensor:
        """The same function from stock ops: any core structure, mixed dtypes (fp32 factors on a bf16 base)
        and autocast. h = A·drop(x), z = C h (cores.apply_core), B z."""
        W = self._dense() if self.mode.uses_weight else None
        out = base_output(x, W, self.bias, self.out_features)
        dtype = self.factor_dtype
        h = self.dropout(x.to(dtype))
        if self.lora_A is not None:
            h = F.linear(h, self.lora_A)
        if c is not None:
            h = apply_core(h, c)
        delta = F.linear(h, self.lora_B) if self.lora_B is not None else h
        if self.mode is Mode.SUBTRACT:
            delta = delta - F.linear(F.linear(x.to(dtype), self.init_A), self.init_B)
        if delta.dtype == out.dtype:
            return torch.add(out, delta, alpha=self.scaling)
        return out + (self.scaling * delta).to(out.dtype)

    # -- dense views (fp32 or the factor dtype) --------------------------------------------------
    def _update(self, subtract: bool, core: Tensor | None = None) -> Tensor:
        """B C A (− B₀ A₀), unscaled, shape (out, in); ``core`` replaces the core's current value."""
        Bc = self.output_factor() if core is None else output_side(self.lora_B, core)
        update = Bc if self.lora_A is None else Bc @ self.lora_A
        return update - self.init_B @ self.init_A if subtract else update

    def delta_weight(self) -> Tensor:
        """ΔW relative to the original weight: s·(B C A − B₀ A₀), shape (out, in); s·B C A − W when the
        factors replace W."""
        if self.mode is Mode.FACTORS_ONLY:
            return self.scaling * (self._update(False) - self._update(False, self.core.base()))
        if self.mode is Mode.FACTORS:
            update = self._update(False)
            return self.scaling * update - self._dense().to(update.dtype)
        return self.scaling * self._update(self.init_A is not None)

    def original_weight(self) -> Tensor:
        """The weight the layer was adapted from: bit-exact unless folded (then W_res + s·B₀A₀, or
        s·B·core.base()·A for a dropped weight)."""
        if self.mode is Mode.FACTORS_ONLY:
            return (self.scaling * self._update(False, self.core.base())).to(self.weight_dtype)
        W = self._dense()
        if self.mode is not Mode.RESIDUAL:
            return W
        return (W.to(self.init_A.dtype) + self.scaling * (self.init_B @ self.init_A)).to(W.dtype)

    def merged_weight(self) -> Tensor:
        if not self.mode.uses_weight:  # the factors alone, whether W was dropped or kept
            return (self.scaling * self._update(False)).to(self.weight_dtype)
        W = self._dense()
        update = self._update(self.mode is Mode.SUBTRACT)  # W_res already lacks s·B₀A₀
        return (W.to(update.dtype) + self.scaling * update).to(W.dtype)

    def merged_bias(self) -> Tensor | None:
        if self.lora_bias is None:
            return self.bias
        b = self.lora_bias.detach() if self.bias is None else self.bias.detach() + self.lora_bias.detach()
        return b.to(self.weight_dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
            f"trains={sorted(n for n, _ in self.adapter_parameters())}, mode={self.mode.value}"
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
