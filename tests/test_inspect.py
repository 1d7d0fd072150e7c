"""svdkit.spectrum and its metrics on hand-made matrices with known spectra (planted power law, planted
intruder, random matrix vs the Marchenko–Pastur edge), adapters analysed from their factors, PEFT LoRA
with its scaling, GPT-2's Conv1D orientation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import svdkit
from svdkit.inspection.diagnostics import intruder_dimensions
from svdkit.inspection.esd import mp_bulk, mp_median, powerlaw_fit, spectral_metrics
from tests.conftest import perturb_adapters, tiny_model


def _orth(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q


def _with_spectrum(S: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    q = S.numel()
    return _orth(m, q, seed) @ torch.diag(S.double()) @ _orth(n, q, seed + 1).T


def _net(W: torch.Tensor) -> nn.Module:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(W)
    return nn.Sequential(lin)


def _ww_fit_loop(x):
    """WeightWatcher's fit written as its equations, one candidate x_min at a time (the reference)."""
    x = sorted(float(v) for v in x)
    best = (2.0, None, None)
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        alpha = 1 + n / sum(math.log(v / x[i]) for v in tail)
        D = max(abs(1 - (v / x[i]) ** (1 - alpha) - j / n) for j, v in enumerate(tail)) if alpha > 1 else 1.0
        if D < best[0]:
            best = (D, alpha, x[i])
    return best


def test_powerlaw_fit_matches_the_equations_and_recovers_a_planted_exponent():
    g = torch.Generator().manual_seed(0)
    x = (1 - torch.rand(300, generator=g, dtype=torch.float64)) ** (-1 / 2.0)  # Pareto, density ∝ x^-3
    fit = powerlaw_fit(x)
    D, alpha, xmin = _ww_fit_loop(x)
    assert fit["D"] == pytest.approx(D, rel=1e-9) and fit["alpha"] == pytest.approx(alpha, rel=1e-9)
    assert fit["xmin"] == pytest.approx(xmin)
    big = (1 - torch.rand(4000, generator=g, dtype=torch.float64)) ** (-1 / 2.0)
    assert powerlaw_fit(big)["alpha"] == pytest.approx(3.0, abs=0.15)
    assert math.isnan(powerlaw_fit(torch.tensor([1.0, 2.0]))["alpha"])


def test_spectrum_recovers_a_planted_power_law_spectrum():
    g = torch.Generator().manual_seed(1)
    lam = (1 - torch.rand(96, generator=g, dtype=torch.float64)) ** (-1 / 1.5)  # ESD tail with α = 2.5
    net = _net(_with_spectrum(lam.sqrt().sort(descending=True).values, 128, 96))
    row = svdkit.spectrum(net, progress=False)[0]  # eigenvalues in fp32 (the default)
    exact = svdkit.spectrum(net, dtype=torch.float64, progress=False)[0]
    assert exact["alpha"] == pytest.approx(powerlaw_fit(lam)["alpha"], rel=1e-6)  # the ESD is exactly λ
    assert row["alpha"] == pytest.approx(exact["alpha"], abs=5e-3)
    assert 1.9 < row["alpha"] < 3.1 and row["warning"] == ""
    assert row["alpha_weighted"] == pytest.approx(row["alpha"] * math.log10(float(lam.max())), rel=1e-6)


def test_norms_and_ranks_match_their_definitions():
    S = torch.tensor([5.0, 4.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    row = spectral_metrics(S.square(), 8, 6)
    p = S / S.sum()
    assert row["sigma_max"] == pytest.approx(5.0) and row["nuclear"] == pytest.approx(float(S.sum()))
    assert row["frobenius"] == pytest.approx(float(S.norm()))
    assert row["stable_rank"] == pytest.approx(float(S.square().sum()) / 25)
    assert row["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    cum = (S.square().cumsum(0) / S.square().sum()).tolist()  # 0.540, 0.886, 0.973, 0.994, 0.9998, 1
    assert row["rank_90"] == 3 and row["rank_99"] == 4 and cum[1] < 0.9 <= cum[2] and cum[2] < 0.99 <= cum[3]
    assert row["log_spectral_norm"] == pytest.approx(math.log10(25.0))
    assert row["log_norm"] == pytest.approx(math.log10(float(S.square().sum())))
    fit = powerlaw_fit(S.square())
    assert row["alpha"] == pytest.approx(fit["alpha"]) and row["num_pl_spikes"] == fit["num_pl_spikes"]
    assert row["alpha_sigma"] == pytest.approx((row["alpha"] - 1) / math.sqrt(row["num_pl_spikes"]))
    assert row["alpha_xmin"] == pytest.approx(float(S.square()[row["num_pl_spikes"] - 1]))  # x_min is the n-th largest λ


def test_random_matrix_stays_inside_the_mp_edge_and_planted_spikes_do_not():
    assert mp_median(1.0) == pytest.approx(0.6528, abs=2e-4)  # Gavish & Donoho 2014, Table/Eq. for β = 1
    for seed, (m, n) in enumerate([(200, 200), (300, 120), (120, 300)]):
        X = 0.05 * torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        mp = mp_bulk(torch.linalg.svdvals(X), m, n)
        assert mp["mp_spikes"] == 0 and mp["mp_sigma"] == pytest.approx(0.05, rel=0.05)
        assert mp["mp_edge"] == pytest.approx(0.05 * (math.sqrt(m) + math.sqrt(n)), rel=0.08)
        assert mp["mp_softrank"] == pytest.approx((mp["mp_edge"] / float(torch.linalg.svdvals(X)[0])) ** 2)
    X = 0.05 * torch.randn(200, 150, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    signal = _with_spectrum(torch.tensor([6.0, 5.0, 4.0]), 200, 150, seed=3)  # far above the edge ≈ 1.32
    row = svdkit.spectrum(_net(X + signal), progress=False)[0]
    assert row["mp_spikes"] == 3


def _planted_intruder():
    S0 = torch.linspace(3.0, 0.5, 24, dtype=torch.float64)
    U0, V0 = _orth(24, 24, 5), _orth(20, 20, 6)
    W0 = U0[:, :20] @ torch.diag(S0[:20]) @ V0.T
    u = U0[:, :5].sum(1) / math.sqrt(5)  # best |cos| with every base direction is 1/√5 ≈ 0.447 < 0.5
    v = V0[:, 19]
    return W0, W0 + 10.0 * torch.outer(u, v)


def test_a_planted_intruder_is_found_with_its_energy_share():
    W0, W1 = _planted_intruder()
    row = svdkit.spectrum(_net(W1), base=_net(W0), k=4, progress=False)[0]
    assert row["intruders"] == 1 == intruder_dimensions(W0, W1, k=4)
    assert row["intruder_cos"][0] == pytest.approx(1 / math.sqrt(5), abs=0.03)
    S1 = torch.linalg.svdvals(W1)[:4]
    assert row["intruder_energy"] == pytest.approx(float(S1[0] ** 2 / S1.square().sum()), rel=1e-4)
    assert row["top_sigma_change"] == pytest.approx(float(S1[0] / 3.0 - 1), rel=1e-4)
    assert row["delta_sigma_max"] == pytest.approx(10.0, rel=1e-6) and row["delta_stable_rank"] == pytest.approx(1.0)
    assert row["delta_rel_fro"] == pytest.approx(10.0 / float(W0.norm()), rel=1e-6)  # ΔW = 10·u vᵀ, rank 1
    assert row["delta_effective_rank"] == pytest.approx(1.0, abs=1e-3)
    U0, U1 = torch.linalg.svd(W0)[0][:, :4], torch.linalg.svd(W1)[0][:, :4]
    cos = torch.linalg.svdvals(U0.T @ U1).clamp(max=1)  # principal angles between the top-4 subspaces, directly
    assert row["subspace_overlap"] == pytest.approx(float(cos.square().mean()), abs=1e-5) and row["subspace_overlap"] < 1.0
    assert row["subspace_angle_max"] == pytest.approx(math.degrees(math.acos(float(cos.min()))), abs=0.05)
    same = svdkit.spectrum(_net(W0), base=_net(W0.clone()), k=4, progress=False)[0]
    assert same["intruders"] == 0 and same["subspace_overlap"] == pytest.approx(1.0, abs=1e-5)
    assert same["top_sigma_change"] == pytest.approx(0.0, abs=1e-6) and same["subspace_angle_max"] < 0.5
    loose = svdkit.spectrum(_net(W1), base=_net(W0), k=4, eps=0.4, progress=False)[0]
    assert loose["intruders"] == 0  # 0.447 ≥ 0.4


def test_svdkit_adapter_is_analysed_from_its_factors_with_its_own_base():
    model = tiny_model("llama")
    svdkit.adapt(model, svdkit.config("pissa", rank=4))
    perturb_adapters(model)
    rows = {r["name"]: r for r in svdkit.spectrum(model, progress=False)}
    layers = dict(svdkit.adapters.api.adapted_layers(model))
    for name, layer in list(layers.items())[:3]:
        r = rows[name]
        delta = torch.linalg.svdvals(layer.delta_weight().detach().double())
        merged = torch.linalg.svdvals(layer.merged_weight().detach().double())
        assert r["kind"] == "svdkit-adapter" and r["has_base"] and r["adapter_rank"] == 4
        assert r["delta_sigma_max"] == pytest.approx(float(delta[0]), rel=1e-5)
        assert r["sigma_max"] == pytest.approx(float(merged[0]), rel=1e-5)
        assert r["intruders"] == intruder_dimensions(layer.original_weight(), layer.merged_weight(), k=10)
    assert rows["lm_head"]["head"] and rows["lm_head"]["kind"] == "linear"


def test_peft_lora_applies_its_scaling():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    rows = svdkit.spectrum(model, progress=False)
    lora = [r for r in rows if r["kind"] == "peft-lora"]
    assert len(lora) == 4 and len(rows) == 15
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    module = model.get_submodule(name)
    r = next(r for r in lora if r["name"] == name)
    delta = module.get_delta_weight("default").detach().double()  # includes s = lora_alpha / r = 4
    assert r["delta_sigma_max"] == pytest.approx(float(torch.linalg.svdvals(delta)[0]), rel=1e-5)
    W = module.base_layer.weight.double() + delta
    assert r["sigma_max"] == pytest.approx(float(torch.linalg.svdvals(W)[0]), rel=1e-5)
    plain = {x["name"]: x for x in svdkit.spectrum(model, base=base, progress=False)}
    assert plain["base_model.model.model.layers.0.self_attn.k_proj"]["intruders"] == 0  # untouched, matched by name


def test_gpt2_conv1d_rows_are_out_by_in_and_errors_are_specific():
    model = tiny_model("gpt2")
    rows = svdkit.spectrum(model, progress=False)
    attn = next(r for r in rows if r["name"] == "transformer.h.0.attn.c_attn")
    assert (attn["m"], attn["n"], attn["kind"], attn["layer"], attn["module"]) == (96, 32, "conv1d", 0, "c_attn")
    assert [r["name"] for r in rows if r["head"]] == ["lm_head"]
    with pytest.raises(ValueError, match="no module name"):
        svdkit.spectrum(model, base=_net(torch.randn(3, 3)), progress=False)
    other = tiny_model("llama")
    with pytest.raises(ValueError, match="base weight has shape"):
        svdkit.spectrum(_net(torch.randn(5, 4)), base=_net(torch.randn(4, 5)), progress=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        svdkit.spectrum(nn.Sequential(nn.ReLU()), progress=False)
    assert len(svdkit.spectrum(other, progress=False)) == 15
