"""Input fusion: adapted layers that read the same input tensor (q/k/v, gate/up) computed as one.

In a Llama block q_proj, k_proj and v_proj are called one after the other on the same ``hidden_states``
object, as are gate_proj and up_proj on the MLP input. Unfused, each adapter does its own skinny rank-r
GEMMs (x Aᵀ forward; ∂y B, G A and Gᵀ x backward) and autograd sums the three ∂x. Fused, the first member
called computes every member's output through :class:`svdkit.adapters.fused.SharedInputFn` (one GEMM
x [A_q; A_k; A_v]ᵀ, one ∂x GEMM and one ∂A GEMM for the group, ∂x of the bases accumulated in place), and
hands the others their outputs when they are called with that same tensor. The result is the same
computation: outputs and gradients equal the unfused layers' up to floating-point summation order.

Which layers form a group is *observed*, never guessed from names: while a layer is not yet placed
(its first forward), consecutive calls of fusable layers on the same tensor object are recorded; once a
call on another tensor follows (or a recorded layer reads it again), the layers seen together become a
group (a layer seen alone stays unfused). So the first forward is unfused, and any architecture that
feeds one tensor to several adapted linears (Llama's q/k/v and gate/up, BERT's query/key/value, tested;
by the same rule parallel attention+MLP blocks or cross-attention's k/v) is fused from the second on,
while layers reading different tensors never are.

A member is fusable when its layer takes the fused path of ``SpectralLinear.forward`` (plain A and B,
or a dense core folded into B·C), has no dropout (each layer would draw its own mask, so x is not shared),
and A is not the identity. A group falls back to per-layer computation whenever it cannot be sure: a
member called with another tensor, an input or a member's tensors modified in place since the group
ran, another grad mode, a module copy (``copy.deepcopy`` gives the copy its own, unobserved slot;
DataParallel replicas are not members). A group whose precomputed outputs go unused three times
(a member that is skipped or fed a different tensor) is dissolved for good, so a wrong group costs at
most three wasted member computations.

Switch: ``svdkit.fuse_shared_inputs(model, True)`` (or ``SpectralLinear.fuse_inputs``). Default OFF: the
whole training step gains little (quiet Intel Xeon, single run of ``benchmarks/train_overhead.py --fused``:
LoRA r16 1.111× vs 1.133× the frozen floor, PiSSA 1.145× vs 1.165×, i.e. ~2 %, where two identical
variants differed by 0.6 %; BENCHMARKS.md), and because the first forward only observes, a run resumed
from a checkpoint computes its first step unfused where the uninterrupted run was fused: last-bit
differences that break the bit-exact resume svdkit promises. It never needs more memory (the stacked
factors are r×n-sized; the saved h is the members' h side by side). OFF is the per-layer computation
(bit-for-bit the behaviour before fusion).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import Tensor, nn

from svdkit.adapters.fused import AdaptedLinearFn, SharedInputFn

MAX_MISSES = 3  # unused precomputed outputs before a group is dissolved
_observed = threading.local()  # .x: weakref to the last input, .layers: weakrefs of the layers that read it


class FusionSlot:
    """A layer's place in input fusion: not yet observed, alone, or a member of a :class:`_Group`.

    A (deep or shallow) copy or a pickled one starts unobserved, so a copied model finds its own groups."""

    def __init__(self):
        self.observed = False
        self.group: _Group | None = None

    def __deepcopy__(self, memo):
        return FusionSlot()

    def __copy__(self):
        return FusionSlot()

    def __reduce__(self):  # pickled (torch.save of a whole model) as a fresh slot: groups hold weakrefs
        return FusionSlot, ()


class _Group:
    """Layers observed to read one input tensor, and the outputs computed for members not yet called."""

    def __init__(self, layers: list[nn.Module]):
        self.members = [weakref.ref(layer) for layer in layers]
        self.pending: dict[int, Tensor] = {}  # id(layer) → its 2-D output, for the input below
        self.key: tuple | None = None  # (weakref to x, x._version, grad mode)
        self.versions: dict[int, tuple] = {}  # id(layer) → its tensors' versions when computed
        self.misses = 0

    def take(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        out = self.pending.pop(id(layer), None)
        if out is None or self.key is None:
            return None
        ref, version, grad = self.key
        if ref() is x and x._version == version and grad == torch.is_grad_enabled() and \
                self.versions.get(id(layer)) == _versions(layer):
            return out
        return None

    def dissolve(self) -> None:
        for ref in self.members:
            layer = ref()
            if layer is not None:
                layer.input_fusion.group = None
        self.pending.clear()


def _versions(layer: nn.Module) -> tuple:
    return tuple(t._version for t in layer.parameters()) + tuple(t._version for t in layer.buffers())


def forward(layer: nn.Module, x: Tensor, x2: Tensor, operands: tuple) -> Tensor:
    """``layer``'s 2-D output for x (the module input; ``x2`` its 2-D view) with its ``operands``
    (W, bias, A, B·C, A0, B0, s): from its group's precomputed outputs, by computing its group, or alone."""
    slot: FusionSlot = layer.input_fusion
    group = slot.group
    if group is not None and any(ref() is layer for ref in group.members):
        stale = bool(group.pending)
        out = group.take(layer, x)
        if out is not None:
            return out
        if stale:  # outputs computed for members that were not called (with that input, unchanged)
            group.misses += 1
            group.pending.clear()
            if group.misses >= MAX_MISSES:
                group.dissolve()
                return AdaptedLinearFn.apply(x2, None, *operands)
        out = _run_group(layer, group, x, x2, operands)
        if out is not None:
            return out
    elif not slot.observed:
        _observe(layer, x)
    return AdaptedLinearFn.apply(x2, None, *operands)


def _run_group(layer: nn.Module, group: _Group, x: Tensor, x2: Tensor, operands: tuple) -> Tensor | None:
    """Compute every fusable member's output in one SharedInputFn; keep the others' as pending."""
    members, ops = [layer], [operands]
    for ref in group.members:
        other = ref()
        if other is None or other is layer:
            continue
        other_ops = other.fusable_operands(x)
        if other_ops is not None:
            members.append(other)
            ops.append(other_ops)
    if len(members) < 2:
        return None
    flat = [t for op in ops for t in op[:6]]
    outs = SharedInputFn.apply(tuple((op[6], op[4] is not None) for op in ops), x2, *flat)
    group.key = (weakref.ref(x), x._version, torch.is_grad_enabled())
    group.pending = {id(m): out for m, out in zip(members[1:], outs[1:])}
    group.versions = {id(m): _versions(m) for m in members[1:]}
    return outs[0]


def _observe(layer: nn.Module, x: Tensor) -> None:
    """Record that ``layer`` read x; a call on a new tensor closes the previous record into a group."""
    ref = getattr(_observed, "x", None)
    if ref is not None and ref() is x and not any(seen() is layer for seen in _observed.layers):
        _observed.layers.append(weakref.ref(layer))
        return  # (a layer reading x again starts a new record: the next forward on the same input)
    _close_observation()
    _observed.x, _observed.layers = weakref.ref(x), [weakref.ref(layer)]


def _close_observation() -> None:
    seen = [ref() for ref in getattr(_observed, "layers", [])]
    seen = [layer for layer in seen if layer is not None and not layer.input_fusion.observed]
    group = _Group(seen) if len(seen) > 1 else None
    for layer in seen:
        layer.input_fusion.observed = True
        layer.input_fusion.group = group
    _observed.x, _observed.layers = None, []


def fuse_shared_inputs(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn input fusion on or off for every adapted layer of ``model`` (default: off; see the module
    docstring). Switching forgets the observed groups, so they are observed afresh. Returns ``model``."""
    if not isinstance(enabled, bool):
        raise TypeError(f"fuse_shared_inputs: enabled must be True or False, got {enabled!r}")
    found = False
    for module in model.modules():
        if isinstance(getattr(module, "input_fusion", None), FusionSlot):
            module.fuse_inputs = enabled
            module.input_fusion = FusionSlot()
            found = True
    if not found:
        raise ValueError("fuse_shared_inputs: the model has no svdkit adapted layers; call svdkit.adapt first.")
    return model
