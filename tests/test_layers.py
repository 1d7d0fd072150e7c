"""SpectralLinear on its own: y = W x + b + s·B C A·drop(x) − s·B₀A₀·x (+ Δb), against the formula, with
the hand-written backward checked against autograd of the composed formula (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdkit.adapters.cores import BlockScale, Delta
from svdkit.adapters.layers import Mode, SpectralLinear

M, N, R, S = 7, 5, 3, 0.7


def _layer(kind: str, dropout: float = 0.0) -> tuple[SpectralLinear, torch.Tensor]:
    """(layer, ΔW it must add at its current values) for one adapter shape."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    base = nn.Linear(N, M).double()
    A, B, v, v0 = rnd(R, N), rnd(M, R), rnd(R), rnd(R)
    if kind == "factors":  # PiSSA-like: trainable B, A; frozen copies subtracted
        layer = SpectralLinear(base, A, B, A0=A * 0.5, B0=B * 2, scaling=S, dropout=dropout)
        delta = B @ A - (B * 2) @ (A * 0.5)
    elif kind == "diag-core":  # SVFit-like: frozen B, A, trainable diagonal measured from its init
        layer = SpectralLinear(base, A, B, core=Delta(v, v0), trainable=frozenset(), scaling=S, dropout=dropout)
        delta = B @ torch.diag(v - v0) @ A
    elif kind == "matrix-core-no-B":  # B = identity: C is (out × r)
        C = rnd(M, R)
        layer = SpectralLinear(base, A, None, core=Delta(C), trainable=frozenset("A"), scaling=S, dropout=dropout)
        delta = C @ A
    elif kind == "dense-core":  # A = B = identity: C is the whole (out × in) update
        C = rnd(M, N)
        layer = SpectralLinear(base, None, None, core=Delta(C), trainable=frozenset(), scaling=S, dropout=dropout)
        delta = C
    elif kind == "weightless":  # the factors replace W in the forward (CLOVER's V·O pair); W is kept, unused
        C = rnd(R, R)
        layer = SpectralLinear(base, A, B, core=Delta(C), trainable=frozenset("A"), scaling=S, dropout=dropout,
                               mode=Mode.FACTORS)  # fmt: skip
        return layer, S * (B @ C @ A) - base.weight.detach()
    elif kind == "block-scale-bias":  # MultiLoRA-like scales per block of components, plus a trained bias
        A2, B2, sc = rnd(2 * R, N), rnd(M, 2 * R), rnd(2)
        layer = SpectralLinear(base, A2, B2, core=BlockScale(sc, R), scaling=S, dropout=dropout, bias=True)
        with torch.no_grad():
            layer.lora_bias.copy_(rnd(M))
        delta = B2 @ torch.diag(sc.repeat_interleave(R)) @ A2
    else:
        raise ValueError(kind)
    return layer, S * delta


KINDS = ["factors", "diag-core", "matrix-core-no-B", "dense-core", "block-scale-bias", "weightless"]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_dense_views_follow_the_formula(kind):
    layer, delta = _layer(kind)
    x = torch.randn(2, 4, N, dtype=torch.float64)
    W, b = layer.weight, layer.bias
    extra = 0 if layer.lora_bias is None else layer.lora_bias
    expected = x @ (W + delta).T + b + extra
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), delta)
    torch.testing.assert_close(layer.merged_weight(), W + delta)


@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_equals_autograd_of_the_composed_formula(kind, dropout):
    layer, _ = _layer(kind, dropout)
    layer.train()
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, N, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, M, dtype=torch.float64)
    params = [x, layer.weight, layer.bias] + [p for _, p in layer.adapter_parameters()]
    torch.manual_seed(5)
    fast = torch.autograd.grad(layer(x), params, g, allow_unused=True)  # a weightless layer does not use W
    torch.manual_seed(5)
    out = layer._forward_composed(x, None if layer.core is None else layer.core())  # stock autograd, dense core
    out = out if layer.lora_bias is None else out + layer.lora_bias
    slow = torch.autograd.grad(out, params, g, allow_unused=True)
    for a, b in zip(fast, slow):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    assert (fast[1] is None) == (kind == "weightless")


@pytest.mark.parametrize("fold", [False, True])
def test_weightless_layer_keeps_w_for_unadapt(fold):
    """W stays (frozen, unused) when the core cannot rebuild it: unadapt is bit-exact, merge is s·B C A."""
    base = nn.Linear(N, M).double()
    W = base.weight
    layer, delta = _layer("weightless")
    layer = SpectralLinear(base, layer.lora_A, layer.lora_B, core=layer.core, trainable=frozenset("A"), scaling=S,
                           mode=Mode.FACTORS, fold=fold)  # fmt: skip
    layer.fold_base()
    assert not layer.folded and layer.weight is W
    expected = S * layer.output_factor() @ layer.lora_A
    torch.testing.assert_close(layer.merged_weight(), expected)
    torch.testing.assert_close(layer.delta_weight(), expected - W)
    x = torch.randn(4, N, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ expected.T + base.bias)
    restored = layer.restored()
    assert restored is base and restored.weight is W


def test_an_adapter_needs_an_output_side():
    with pytest.raises(ValueError, match="output factor B or a core"):
        SpectralLinear(nn.Linear(N, M), torch.zeros(R, N), None, scaling=1.0)
