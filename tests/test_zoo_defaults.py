"""Issue 12: every method's default is the method METHODS.md specifies, checked against direct formulas.

NLoRA/IntTune N = W[:r, :r] (§17, released code); SVFT's kaiming-normal core (§6 [code]) and its optional
truncation (§6b); KaSA s = 2; SoMA α = r; SORSA/AdaLoRA regularizers at the reference normalization (their
gradient/PEFT-parity tests live in tests/test_zoo_sorsa_kasa.py and tests/test_zoo_adalora.py); methods that
ignore ``rank`` never let it into their scaling.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import svdkit
from svdkit.core.linalg import layer_seed

M, N = 12, 9
IGNORE_RANK = ("svft", "clip-svd", "vectorfit", "clover", "full", "qr-lora")


def one_linear(m: int = M, n: int = N, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, m).double())


def reference_svd(W: torch.Tensor):
    """Thin SVD with the largest-|entry| of each left singular vector made positive (svdkit's sign rule)."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    flip = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True))).squeeze(0)
    return U * flip, S, Vh * flip[:, None]


# -- NLoRA / IntTune: N = W[:r, :r], base function at init --------------------------------------------------
@pytest.mark.parametrize("method,trainable", [("nlora", 4 * (M + N) + 16), ("inttune", 16)])
def test_nystrom_default_is_the_released_codes_slice_made_function_preserving(method, trainable):
    model = one_linear()
    W = model[0].weight.detach().clone()
    cfg = svdkit.config(method, rank=4, compute_dtype="float64")
    assert cfg.nystrom_core == "slice" and cfg.preserve_init
    svdkit.adapt(model, cfg)
    layer = model[0]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    torch.testing.assert_close(layer.delta_weight().detach(), torch.zeros_like(W))  # the base function at init
    N0 = W[:4, :4]  # no pseudo-inverse
    torch.testing.assert_close(layer.core.value.detach(), N0)
    with torch.no_grad():
        layer.core.value.add_(0.5)  # train N: ΔW = s·B(N − N₀)A, B = W[:, :r], A = W[:r, :]
    expected = W[:, :4] @ (N0 + 0.5 - N0) @ W[:4, :]
    torch.testing.assert_close(layer.delta_weight().detach(), expected)


@pytest.mark.parametrize("method", ["nlora", "inttune"])
def test_nystrom_literal_init_adds_b_n_a_to_w(method):
    model = one_linear()
    W = model[0].weight.detach().clone()
    svdkit.adapt(model, svdkit.config(method, rank=4, preserve_init=False, compute_dtype="float64"))
    torch.testing.assert_close(model[0].delta_weight().detach(), W[:, :4] @ W[:4, :4] @ W[:4, :])
    with pytest.raises(ValueError, match="preserve_init must be True or False"):
        svdkit.config(method, preserve_init="yes")


# -- SVFT ----------------------------------------------------------------------------------------------------
def svft_reference(W: torch.Tensor, seed: int, name: str, t: int | None = None) -> torch.Tensor:
    """U_t(Σ_t + ½·M₀)V_tᵀ, M₀ = diag(√(2/t)·N(0, 1)) from the layer's generator (plain pattern, s = 1)."""
    U, S, Vh = reference_svd(W)
    t = S.numel() if t is None else t
    values = torch.randn(t, generator=torch.Generator().manual_seed(layer_seed(seed, name))).double()
    return U[:, :t] @ torch.diag(S[:t] + 0.5 * values * math.sqrt(2.0 / t)) @ Vh[:t]


def test_svft_default_is_the_codes_kaiming_core_and_its_gate_learns_at_step_0():
    model = one_linear()
    W = model[0].weight.detach().clone()
    cfg = svdkit.SVFT(compute_dtype="float64")
    assert cfg.init == "kaiming" and cfg.svd_rank is None
    svdkit.adapt(model, cfg)
    layer = model[0]
    torch.testing.assert_close(W + layer.delta_weight().detach(), svft_reference(W, cfg.seed, "0"))
    x = torch.randn(5, N, dtype=torch.float64)
    model(x).square().sum().backward()
    assert float(layer.core.gate.grad.abs().sum()) > 1e-6  # M₀ ≠ 0: the gate gets a gradient at once
    zero = one_linear()
    svdkit.adapt(zero, svdkit.SVFT(init="zero", compute_dtype="float64"))
    zero(x).square().sum().backward()
    assert float(zero[0].core.gate.grad.abs().sum()) == 0.0  # the option's documented drawback


def test_svft_svd_rank_keeps_the_top_t_triplets_and_discards_the_tail():
    model = one_linear()
    W = model[0].weight.detach().clone()
    svdkit.adapt(model, svdkit.SVFT(svd_rank=4, compute_dtype="float64"))
    layer = model[0]
    torch.testing.assert_close(W + layer.delta_weight().detach(), svft_reference(W, 0, "0", t=4))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 + 1  # t entries + the gate
    x = torch.randn(3, N, dtype=torch.float64)
    with torch.no_grad():
        want = x @ svft_reference(W, 0, "0", t=4).T + model[0].bias
        torch.testing.assert_close(model(x), want)


def test_svft_svd_rank_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="svd_rank must be None"):
        svdkit.SVFT(svd_rank=0)
    with pytest.raises(ValueError, match="fold=True is not available"):
        svdkit.SVFT(svd_rank=4, fold=True)
    with pytest.raises(ValueError, match=r"svd_rank=9 must be < min\(out, in\) = 9"):
        svdkit.adapt(one_linear(), svdkit.SVFT(svd_rank=9))


# -- KaSA s = 2, SoMA α = r ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [2, 4, 16])
def test_kasa_scaling_is_the_papers_two_and_soma_follows_the_rank(rank):
    assert svdkit.KaSA(rank=rank).scaling == pytest.approx(2.0)  # α = 2r
    assert svdkit.KaSA(rank=rank, alpha=3.0).scaling == pytest.approx(3.0 / rank)
    assert svdkit.SoMA(rank=rank).scaling == pytest.approx(1.0)  # α = r, as the official r = α = 16


def test_kasa_discarded_tail_is_exact_at_s_two():
    model = one_linear()
    W = model[0].weight.detach().clone()
    svdkit.adapt(model, svdkit.KaSA(rank=3, compute_dtype="float64"))
    layer = model[0]
    U, S, Vh = reference_svd(W)
    assert layer.scaling == pytest.approx(2.0)
    tail = (U[:, -3:] * S[-3:]) @ Vh[-3:]
    torch.testing.assert_close(layer.delta_weight().detach(), -tail)  # B = 0: ΔW = −U_tail Σ_tail V_tailᵀ


# -- methods that ignore rank ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", IGNORE_RANK)
def test_rank_never_enters_the_scaling_of_methods_that_ignore_it(method):
    assert svdkit.config(method).uses_rank is False
    for rank in (1, 4, 64):
        assert svdkit.config(method, rank=rank).scaling == 1.0
        assert svdkit.config(method, rank=rank, alpha=3.0).scaling == 3.0
    with pytest.raises(ValueError, match="ignores rank, so use_rslora"):
        svdkit.config(method, use_rslora=True)


@pytest.mark.parametrize("method", ["svft", "clip-svd", "full"])
def test_adapted_layers_of_rank_ignoring_methods_have_the_same_scaling_whatever_the_rank(method):
    layers = []
    for rank in (2, 8):
        model = one_linear()
        svdkit.adapt(model, svdkit.config(method, rank=rank, alpha=2.0))
        layers.append(model[0])
    assert layers[0].scaling == layers[1].scaling == 2.0
