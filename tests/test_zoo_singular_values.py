"""SVFit, CLIP-SVD and VectorFit (METHODS.md §7) against their defining equations, written out here.

ΔW = s·U diag(σ − σ₀) Vᵀ with the singular triplets of W (top-r for SVFit, all k for the others), plus
VectorFit's Δb and its Adaptive Vector Freezing schedule.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters.export import lora_factors
from svdkit.adapters.zoo.singular_values import avf_frozen

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def linear_model(*layers: tuple[int, int, bool], seed: int = 0) -> nn.Sequential:
    """nn.Sequential of Linear(in, out, bias) with random weights and non-zero biases."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(n, m, bias=b) for n, m, b in layers])
    with torch.no_grad():
        for layer in model:
            if layer.bias is not None:
                layer.bias.normal_(0, 0.1)
    return model


def reference_delta(W: torch.Tensor, delta: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · Σ_{i<len(delta)} δᵢ uᵢ vᵢᵀ from an independent fp64 SVD (sign-invariant per term)."""
    U, _, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    r = delta.numel()
    return scaling * (U[:, :r] * delta.double()) @ Vh[:r]


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- the defining equations ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
@pytest.mark.parametrize("method,options,r", [
    ("svfit", dict(rank=4), 4),
    ("svfit", dict(rank=4, alpha=10.0), 4),
    ("clip-svd", {}, None),
    ("clip-svd", dict(rank=3, alpha=2.0), None),  # rank is ignored, even in s = alpha
    ("vectorfit", {}, None),
])  # fmt: skip
def test_update_is_scaled_singular_value_change(method, options, r, shape):
    m, n = shape
    model = linear_model((n, m, True))
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    cfg = svdkit.config(method, **options)
    svdkit.adapt(model, cfg)
    layer = model[0]
    k = min(m, n) if r is None else r
    S = torch.linalg.svdvals(W.double())[:k]
    assert close(layer.core.initial, S) and torch.equal(layer.core.value, layer.core.initial)
    assert {n for n, _ in layer.adapter_parameters()} >= {"core.value"}
    assert layer.lora_A.shape == (k, n) and layer.lora_B.shape == (m, k)  # frozen bases V_kᵀ, U_k
    delta = torch.randn(k, generator=GEN(1)) * 0.3
    dbias = torch.randn(m, generator=GEN(2)) * 0.1
    with torch.no_grad():
        layer.core.value.add_(delta)
        if layer.lora_bias is not None:
            layer.lora_bias.copy_(dbias)
    s = (options.get("alpha") or cfg.rank) / cfg.rank if cfg.uses_rank else options.get("alpha", 1.0)
    expected = reference_delta(W, delta, s)
    assert close(layer.delta_weight(), expected)
    x = torch.randn(5, n, generator=GEN(3))
    y = x.double() @ (W.double() + expected).T + b.double() + (dbias.double() if method == "vectorfit" else 0)
    assert close(layer(x), y)


def test_every_method_preserves_the_function_at_init():
    for method in ("svfit", "clip-svd", "vectorfit"):
        model = linear_model((9, 12, True), (12, 9, False))
        x = torch.randn(4, 9, generator=GEN(0))
        with torch.no_grad():
            y0 = model(x)
            svdkit.adapt(model, svdkit.config(method, rank=4))
            assert torch.equal(model[0].delta_weight(), torch.zeros(12, 9))  # σ − σ₀ = 0 exactly
            assert close(model(x), y0)


# -- SVFit: the energy rule and the SVD options ---------------------------------------------------
def spectrum_matrix(S: list[float], m: int = 12, n: int = 9) -> torch.Tensor:
    Q1 = torch.linalg.qr(torch.randn(m, len(S), generator=GEN(4))).Q
    Q2 = torch.linalg.qr(torch.randn(n, len(S), generator=GEN(5))).Q
    return (Q1 * torch.tensor(S)) @ Q2.T


# σ² = 16, 4, 1, 1, 1, .25 ×4 (sum 24): cumulative shares .667, .833, .875, .917, .958, …; every threshold sits
# ≥ 0.003 away from a share (never at a tie: a share equal to the threshold is decided by the last bit of BLAS)
@pytest.mark.parametrize("energy,rank,expected", [(0.5, 6, 1), (0.8, 6, 2), (0.85, 6, 3), (0.9, 6, 4), (0.99, 6, 6),
                                                  (0.99, 3, 3), (0.66, 6, 1), (0.67, 6, 2), (1.0, 6, 6)])  # fmt: skip
def test_svfit_energy_keeps_the_smallest_r_reaching_the_share_capped_at_rank(energy, rank, expected):
    W = spectrum_matrix([4, 2, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])
    model = nn.Sequential(nn.Linear(9, 12))
    with torch.no_grad():
        model[0].weight.copy_(W)
    svdkit.adapt(model, svdkit.SVFit(rank=rank, energy=energy))
    assert model[0].rank == expected and trainable(model) == expected
    assert close(model[0].core.initial, torch.tensor([4, 2, 1, 1, 1, 0.5][:expected]), 1e-5)


def test_svfit_energy_gives_each_layer_its_own_rank_and_an_exact_peft_export(tmp_path):
    model = linear_model((9, 12, True), (12, 9, True))
    with torch.no_grad():
        model[0].weight.copy_(spectrum_matrix([4, 2, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]))
        model[1].weight.copy_(spectrum_matrix([1.0] * 9, 9, 12))  # flat: 4 of 9 reach 0.4
    svdkit.adapt(model, svdkit.SVFit(rank=6, energy=0.4))
    assert [model[0].rank, model[1].rank] == [1, 4]
    with torch.no_grad():
        for layer in model:
            layer.core.value.add_(0.5)
    for layer in model:  # rank-r factors: B' = U_r diag(σ − σ₀), A' = V_rᵀ, s·B'A' = ΔW
        A, B = lora_factors(layer)
        assert A.shape[0] == B.shape[1] == layer.rank
        assert close(layer.scaling * B @ A, layer.delta_weight())
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {config["r"], *config["rank_pattern"].values()} == {1, 4}


def test_svfit_honours_the_randomized_svd_options():
    W = torch.randn(40, 30, generator=GEN(6))  # a flat spectrum: a crude sketch misses the top values
    values = {}
    for options in (dict(svd="exact"), dict(svd="randomized", niter=0, oversample=0), dict(svd="randomized")):
        model = nn.Sequential(nn.Linear(30, 40))
        with torch.no_grad():
            model[0].weight.copy_(W)
        svdkit.adapt(model, svdkit.SVFit(rank=4, **options))
        values[tuple(options.values())] = model[0].core.initial.clone()
    exact = torch.linalg.svdvals(W.double())[:4]
    assert close(values[("exact",)], exact)
    assert not close(values[("randomized", 0, 0)], exact, 1e-3)  # niter/oversample reach the engine
    assert close(values[("randomized",)], exact, 1e-3)


# -- parameter counts on real shapes (SmolLM2-135M: hidden 576, MLP 1536) --------------------------
@pytest.mark.parametrize("method,expected", [
    ("svfit", 16 + 16),
    ("clip-svd", 576 + 576),
    ("vectorfit", (576 + 1536) + 576),  # Δb only on the layer with a bias
])  # fmt: skip
def test_trainable_parameters_follow_methods_md(method, expected):
    model = linear_model((576, 1536, True), (1536, 576, False))
    svdkit.adapt(model, svdkit.config(method, rank=16))
    assert trainable(model) == expected
    assert (model[1].lora_bias is None) and ((model[0].lora_bias is not None) == (method == "vectorfit"))


def test_full_spectrum_methods_ignore_rank_and_refuse_peft_export(tmp_path):
    for cls in (svdkit.CLIPSVD, svdkit.VectorFit):
        assert not cls.uses_rank and not cls.exports_lora
        model = linear_model((9, 12, False))
        svdkit.adapt(model, cls(rank=500))  # a rank larger than the matrix: ignored, no error
        assert model[0].rank == 9
        with pytest.raises(ValueError, match="merge"):
            svdkit.export_peft(model, tmp_path / cls.name)
    assert svdkit.SVFit.exports_lora and svdkit.SVFit.uses_rank


def test_learning_rates_and_weight_decay():
    assert (svdkit.CLIPSVD.lr, svdkit.CLIPSVD.weight_decay) == (5e-4, 0.01)  # the official ViT-B/16 config
    assert svdkit.SVFit.weight_decay == svdkit.VectorFit.weight_decay == 0.0


# -- VectorFit: Adaptive Vector Freezing ----------------------------------------------------------
def avf_model(**options):
    # vectors in ranking order: 0.σ (9), 0.Δb (12), 1.σ (9), 2.σ (6), 2.Δb (6)
    model = linear_model((9, 12, True), (12, 9, False), (9, 6, True))
    svdkit.adapt(model, svdkit.VectorFit(**options))
    return model


def frozen(model) -> set[tuple[str, str]]:
    return {(name, p) for name, layer in model.named_children() for p in avf_frozen(layer)}


def move(model, changes: dict[tuple[str, str], torch.Tensor]) -> None:
    """Set each named vector to its initial value plus a known change."""
    with torch.no_grad():
        for (name, pname), change in changes.items():
            layer = model.get_submodule(name)
            if pname == "core.value":
                layer.core.value.copy_(layer.core.initial + change)
            else:
                layer.lora_bias.copy_(change)


def test_avf_freezes_the_vectors_with_the_largest_mean_change_for_one_interval():
    model = avf_model(avf_interval=3, avf_fraction=0.4)  # N = 5 vectors: ⌈0.4·5⌉ = 2 frozen
    first = {  # mean |change| ranks 2.σ, 1.σ first; the L1 norm would pick 0.Δb, 1.σ; the max 1.σ, 0.Δb
        ("0", "core.value"): torch.full((9,), 0.1),                    # mean 0.1
        ("0", "lora_bias"): torch.tensor([0.5] * 6 + [0.0] * 6),       # mean 0.25 (L1 3.0, max 0.5)
        ("1", "core.value"): torch.tensor([2.7] + [0.0] * 8),          # mean 0.3 (L1 2.7, max 2.7)
        ("2", "core.value"): torch.full((6,), -0.4),                   # mean 0.4 (L1 2.4, max 0.4)
        ("2", "lora_bias"): torch.full((6,), 0.05),                    # mean 0.05
    }  # fmt: skip
    move(model, first)
    for step in (1, 2):
        svdkit.after_step(model, step, 10)
        assert frozen(model) == set()
    svdkit.after_step(model, 3, 10)
    assert frozen(model) == {("2", "core.value"), ("1", "core.value")}
    # the strongest change moves to other vectors: the schedule only reacts at the next boundary
    move(model, {("0", "core.value"): torch.full((9,), 2.0), ("2", "lora_bias"): torch.full((6,), 1.0)})
    for step in (4, 5):
        svdkit.after_step(model, step, 10)
        assert frozen(model) == {("2", "core.value"), ("1", "core.value")}
    svdkit.after_step(model, 6, 10)
    assert frozen(model) == {("0", "core.value"), ("2", "lora_bias")}  # the former two are unfrozen


def test_avf_frozen_vectors_get_no_update_and_the_others_do():
    model = avf_model(avf_interval=1, avf_fraction=0.4)
    move(model, {("0", "lora_bias"): torch.full((12,), 0.3), ("1", "core.value"): torch.full((9,), 0.2)})
    svdkit.after_step(model, 1, 10)
    assert frozen(model) == {("0", "lora_bias"), ("1", "core.value")}
    params = {(name, p): t for name, layer in model.named_children() for p, t in layer.adapter_parameters()}
    before = {key: t.detach().clone() for key, t in params.items()}
    opt = torch.optim.AdamW([t for t in params.values()], lr=1e-2, weight_decay=0.1)
    model(torch.randn(4, 9, generator=GEN(7))).square().sum().backward()
    svdkit.after_clipping(model, 1e-2)
    opt.step()
    for key, t in params.items():
        assert (t.grad is None) == (key in frozen(model)), key
        assert torch.equal(t, before[key]) == (key in frozen(model)), key
    assert all(t.requires_grad for t in params.values())  # DDP keeps working: no requires_grad toggling


def test_avf_ties_are_broken_in_layer_order_and_at_least_one_vector_trains():
    model = avf_model(avf_interval=2, avf_fraction=0.4)
    svdkit.after_step(model, 2, 10)  # nothing has moved: all strengths 0
    assert frozen(model) == {("0", "core.value"), ("0", "lora_bias")}
    model = avf_model(avf_interval=2, avf_fraction=0.99)  # ⌈4.95⌉ = 5 capped at N − 1 = 4
    move(model, {("2", "lora_bias"): torch.full((6,), 0.01)})
    svdkit.after_step(model, 2, 10)
    assert frozen(model) == {("2", "lora_bias"), ("0", "core.value"), ("0", "lora_bias"), ("1", "core.value")}


def test_avf_fraction_zero_disables_freezing():
    model = avf_model(avf_interval=1, avf_fraction=0.0)
    move(model, {("0", "lora_bias"): torch.full((12,), 0.3)})
    for step in range(1, 4):
        svdkit.after_step(model, step, 10)
    assert frozen(model) == set()


# -- bad options -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,options,match", [
    (svdkit.SVFit, dict(energy=0.0), r"SVFit: energy .* in \(0, 1\], got 0.0"),
    (svdkit.SVFit, dict(energy=1.5), r"SVFit: energy .* in \(0, 1\]"),
    (svdkit.SVFit, dict(energy="99%"), r"SVFit: energy"),
    (svdkit.VectorFit, dict(avf_interval=0), r"VectorFit: avf_interval must be a positive integer"),
    (svdkit.VectorFit, dict(avf_interval=2.5), r"VectorFit: avf_interval"),
    (svdkit.VectorFit, dict(avf_fraction=1.0), r"VectorFit: avf_fraction .* in \[0, 1\), got 1.0"),
    (svdkit.VectorFit, dict(avf_fraction=-0.1), r"VectorFit: avf_fraction"),
    (svdkit.CLIPSVD, dict(rank=0), r"CLIPSVD: rank must be a positive integer"),
])  # fmt: skip
def test_bad_options_are_refused_with_the_allowed_values(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(**options)


def test_configs_round_trip_through_json():
    for cfg in (svdkit.SVFit(rank=8, energy=0.99), svdkit.VectorFit(avf_interval=50, avf_fraction=0.2)):
        assert svdkit.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
