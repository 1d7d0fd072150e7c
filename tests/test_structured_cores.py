"""Structured cores (cores.py: a vector, a dense matrix, per-head Blocks, Sparse index/value pairs) and the
layer's explicit Mode: each structure against its dense matrix, the layer's forward and backward against
the dense formula y = x (W + s·B C A)ᵀ + b, and SVFT/CLOVER never building their dense core in training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters import cores, layers
from svdkit.adapters.api import adapted_layers
from svdkit.adapters.cores import Blocks, Sparse, apply_core, dense_core
from svdkit.adapters.layers import Init, Mode, SpectralLinear

from conftest import tiny_model

D = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


SPARSE = dict(rows=torch.tensor([0, 2, 2, 4, 1]), cols=torch.tensor([3, 2, 2, 0, 1]), size=5)  # (2, 2) twice


@pytest.mark.parametrize("kind", ["vector", "matrix", "blocks", "sparse", "sparse+diagonal"])
def test_apply_core_is_h_times_the_dense_core(kind):
    if kind == "vector":
        c = _rand(5)
    elif kind == "matrix":
        c = _rand(4, 5)
    elif kind == "blocks":
        c = Blocks(_rand(3, 2, 4))  # 3 heads, 4 in → 2 out each
    else:
        c = Sparse(**SPARSE, values=_rand(5), diagonal=_rand(5, seed=1) if kind == "sparse+diagonal" else None)
    dense = dense_core(c)
    C = torch.diag(dense) if dense.ndim == 1 else dense
    if kind == "blocks":
        assert C.shape == (6, 12) and torch.equal(C[2:4, 4:8], c.blocks[1])
    if kind == "sparse":  # repeated positions add up
        expected = torch.zeros(5, 5, dtype=D)
        for i, j, v in zip(SPARSE["rows"].tolist(), SPARSE["cols"].tolist(), c.values.tolist()):
            expected[i, j] += v
        torch.testing.assert_close(C, expected)
    h = _rand(2, 3, C.shape[1], seed=2)  # any leading dimensions
    torch.testing.assert_close(apply_core(h, c), h @ C.T)


def test_sparse_core_backward_equals_autograd_of_the_dense_product():
    values, diagonal = _rand(5).requires_grad_(), _rand(5, seed=1).requires_grad_()
    h = _rand(7, 5, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda h, v, d: apply_core(h, Sparse(**SPARSE, values=v, diagonal=d)),
                                    (h, values, diagonal))  # fmt: skip
    g = _rand(7, 5, seed=3)
    fast = torch.autograd.grad(apply_core(h, Sparse(**SPARSE, values=values, diagonal=diagonal)), (h, values, diagonal), g)
    dense = torch.diag(diagonal).index_put((SPARSE["rows"], SPARSE["cols"]), values, accumulate=True)
    slow = torch.autograd.grad(h @ dense.T, (h, values, diagonal), g)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)


class _Heads(cores.Core):
    """A trainable block stack (CLOVER-like), dense forward for the views."""

    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(value.clone())

    def forward(self):
        return dense_core(self.structured())

    def structured(self):
        return Blocks(self.value)


@pytest.mark.parametrize("structure", ["blocks", "sparse"])
@pytest.mark.parametrize("mode", [Mode.ADD, Mode.FACTORS])
def test_layer_with_a_structured_core_follows_the_dense_formula(structure, mode):
    from svdkit.adapters.zoo.svft import SparseCore

    m, n, k, s = 6, 8, 6, 0.7
    base = nn.Linear(n, m).double()
    A, B = _rand(k, n, seed=4), _rand(m, k, seed=5)
    if structure == "blocks":
        core = _Heads(_rand(3, 2, 2, seed=6))
    else:
        core = SparseCore(values=_rand(4, seed=6), gate=torch.full((1,), 0.3, dtype=D), rows=torch.tensor([0, 1, 5, 5]),
                          cols=torch.tensor([2, 1, 0, 0]), size=torch.tensor(k))  # fmt: skip
    layer = SpectralLinear(base, A, B, core=core, trainable=frozenset(), scaling=s, mode=mode)
    C = core()
    update = s * B @ C @ A
    W_eff = update if mode is Mode.FACTORS else base.weight.detach() + update
    x = _rand(2, 3, n, seed=7)
    torch.testing.assert_close(layer(x), x @ W_eff.T + base.bias.detach())
    torch.testing.assert_close(layer.merged_weight(), W_eff)
    # gradients of the core's parameters and of x: against autograd of the dense formula
    x.requires_grad_(True)
    params = [x] + [p for _, p in layer.adapter_parameters()]
    g = _rand(2, 3, m, seed=8)
    fast = torch.autograd.grad(layer(x), params, g)
    dense_w = s * B @ core() @ A + (0 if mode is Mode.FACTORS else base.weight.detach())
    slow = torch.autograd.grad(x @ dense_w.T + base.bias.detach(), params, g)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cfg", [svdkit.SVFT(pattern="plain"), svdkit.SVFT(pattern="banded", bands=1),
                                 svdkit.SVFT(pattern="random", num_entries=20, fold=True),
                                 svdkit.CLOVER(head_dim=8)], ids=["svft-plain", "svft-banded", "svft-random-fold", "clover"])  # fmt: skip
def test_training_never_builds_a_dense_core(cfg, monkeypatch):
    model = svdkit.adapt(tiny_model("llama"), cfg, progress=False)
    core = next(layer.core for _, layer in adapted_layers(model))
    expected = {"plain": torch.Tensor, "clover": Blocks}.get(getattr(cfg, "pattern", "clover"), Sparse)
    assert isinstance(core.structured(), expected)

    def refuse(*args, **kwargs):
        raise AssertionError("a dense core was built in training")

    for module, name in ((layers, "dense_core"), (torch, "block_diag"), (torch, "diag")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch.Tensor, "index_put", refuse)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for _, layer in adapted_layers(model) for _, p in layer.adapter_parameters())


@pytest.mark.parametrize("cfg,unfolded,mode", [
    (svdkit.LoRA(rank=2), Mode.ADD, Mode.ADD),
    (svdkit.PiSSA(rank=2), Mode.SUBTRACT, Mode.SUBTRACT),
    (svdkit.PiSSA(rank=2, fold=True), Mode.SUBTRACT, Mode.RESIDUAL),
    (svdkit.SVFit(rank=2, fold=True), Mode.ADD, Mode.ADD),  # nothing to fold
    (svdkit.SVFT(pattern="plain", fold=True), Mode.FACTORS, Mode.FACTORS_ONLY),
    (svdkit.SVFT(pattern="plain"), Mode.FACTORS, Mode.FACTORS),  # U(Σ + ·)Vᵀ alone, W kept for unadapt
    (svdkit.SVFT(pattern="plain", svd_rank=8), Mode.SUBTRACT, Mode.SUBTRACT),  # the discarded tail
], ids=["lora", "pissa", "pissa-fold", "svfit-fold", "svft-fold", "svft", "svft-svd-rank"])  # fmt: skip
def test_the_mode_comes_from_the_init_and_fold(cfg, unfolded, mode):
    model = svdkit.adapt(tiny_model("llama"), cfg, progress=False)
    for _, layer in adapted_layers(model):
        assert layer.mode is mode and layer.fold_to is mode
        assert layer.folded == (mode in (Mode.RESIDUAL, Mode.FACTORS_ONLY))
        assert (layer.weight is None) == (mode is Mode.FACTORS_ONLY)
        assert mode.uses_weight == (mode not in (Mode.FACTORS, Mode.FACTORS_ONLY))
    assert Init(A=None, B=torch.zeros(1, 2, 2), subtract=False, weightless=True).mode is Mode.FACTORS
    assert Init(A=None, B=torch.zeros(1, 2, 2), subtract=False, A0=torch.zeros(1)).mode is Mode.SUBTRACT
    assert unfolded.fold(restorable=True) is mode or not cfg.fold


def test_inconsistent_modes_are_refused():
    base, A, B = nn.Linear(4, 3), torch.zeros(2, 4), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="'subtract' needs frozen initial factors A0, B0"):
        SpectralLinear(base, A, B, scaling=1.0, mode=Mode.SUBTRACT)
    with pytest.raises(ValueError, match="'factors' takes no frozen initial factors"):
        SpectralLinear(base, A, B, scaling=1.0, mode=Mode.FACTORS, A0=A, B0=B)
    with pytest.raises(ValueError, match="unfolded mode .* got 'residual'; pass fold=True"):
        SpectralLinear(base, A, B, scaling=1.0, mode=Mode.RESIDUAL, A0=A, B0=B)
