"""Spectral Adapter A/R, SALT and QR-LoRA against their papers' equations written out here (METHODS.md
§13, §8, §14), plus svdkit.core.linalg_qr.pivoted_qr against the definition of a column-pivoted QR."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters.api import build_layer
from svdkit.adapters.export import lora_factors
from svdkit.core.linalg_qr import pivoted_qr

from conftest import tiny_model
from rows.spectral_salt_qr import reference_pivoted_gs, reference_qr_rank

F64 = dict(compute_dtype="float64")


def random_weight(m: int = 12, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def adapted(cfg, W: torch.Tensor, name: str = "layer"):
    """One adapted nn.Linear (with bias) holding W, built exactly as svdkit.adapt builds it."""
    lin = nn.Linear(W.shape[1], W.shape[0], dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
    return build_layer(lin, cfg, cfg.initialize(W[None].clone(), [name]), 0)


def perturb(layer, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.adapter_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def trainable(layer) -> int:
    return sum(p.numel() for _, p in layer.adapter_parameters() if p.requires_grad)


def tail(W: torch.Tensor, r: int) -> torch.Tensor:
    """U_{r:} Σ_{r:} V_{r:}ᵀ, sign-invariant, from the test's own SVD."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, r:] @ torch.diag(S[r:]) @ Vh[r:]


def check_top_basis(W, U_r, S_r, Vh_r):
    """(U_r, σ_r, V_rᵀ) are W's top-r singular triplets (up to a sign per pair)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = S_r.shape[0]
    torch.testing.assert_close(S_r, S[:r])
    signs = torch.sign((U[:, :r] * U_r).sum(0))
    torch.testing.assert_close(U_r * signs, U[:, :r])
    torch.testing.assert_close(Vh_r * signs[:, None], Vh[:r])


def check_forward(layer, W_prime: torch.Tensor) -> None:
    x = torch.randn(5, W_prime.shape[1], dtype=W_prime.dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W_prime.T + layer.bias)
        torch.testing.assert_close(layer.merged_weight(), W_prime)


def check_export(layer, rank: int) -> None:
    A, B = lora_factors(layer)
    assert A.shape[0] == B.shape[1] == rank
    with torch.no_grad():
        torch.testing.assert_close(layer.scaling * B @ A, layer.merged_weight() - layer.original_weight())


# -- Spectral Adapter A ----------------------------------------------------------------------------------
def test_spectral_a_equation_and_rank_2r_export():
    W, r = random_weight(), 3
    layer = adapted(svdkit.SpectralAdapterA(rank=r, **F64), W)
    U_r, S_r, Vh_r = layer.lora_B.detach().clone(), layer.core().clone(), layer.lora_A.detach().clone()
    check_top_basis(W, U_r, S_r, Vh_r)
    check_forward(layer, W)  # function-preserving at init
    perturb(layer)
    dU, dVh = layer.lora_B.detach() - U_r, layer.lora_A.detach() - Vh_r
    assert dU.abs().max() > 0.1 and dVh.abs().max() > 0.1
    W_prime = (U_r + dU) @ torch.diag(S_r) @ (Vh_r + dVh) + tail(W, r)  # (U_r + ΔU) Σ_r (V_r + ΔV)ᵀ + tail
    check_forward(layer, W_prime)
    assert layer.scaling == 1.0  # no α scaling in the paper
    check_export(layer, 2 * r)


def test_spectral_a_trains_r_m_plus_n_and_only_the_bases():
    layer = adapted(svdkit.SpectralAdapterA(rank=8), torch.randn(128, 512))
    assert trainable(layer) == 8 * (128 + 512)
    assert {n for n, p in layer.adapter_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert not any(p.requires_grad for p in layer.core.parameters())  # Σ_r is frozen
    assert svdkit.SpectralAdapterA.lr == 1e-5


# -- Spectral Adapter R ----------------------------------------------------------------------------------
def skew_from_upper(entries: torch.Tensor, r: int) -> torch.Tensor:
    K = torch.zeros(r, r, dtype=entries.dtype)
    it = iter(entries.tolist())
    for i in range(r):
        for j in range(i + 1, r):
            K[i, j] = next(it)
            K[j, i] = -K[i, j]
    return K


def test_spectral_r_equation_cayley_rotations_and_rank_r_export():
    W, r = random_weight(), 4
    layer = adapted(svdkit.SpectralAdapterR(rank=r, **F64), W)
    U_r, Vh_r, S_r = layer.lora_B.clone(), layer.lora_A.clone(), layer.core.sigma.clone()
    check_top_basis(W, U_r, S_r, Vh_r)
    assert torch.count_nonzero(layer.core()) == 0  # K = 0: Q = I, exactly the original function
    perturb(layer)
    I = torch.eye(r, dtype=W.dtype)
    K = [skew_from_upper(p.detach(), r) for p in (layer.core.k_u, layer.core.k_v)]
    Q = [(I - Kx) @ torch.linalg.inv(I + Kx) for Kx in K]
    for Qx in Q:
        torch.testing.assert_close(Qx.T @ Qx, I)
        assert (Qx - I).abs().max() > 0.1
    W_prime = (U_r @ Q[0]) @ torch.diag(S_r) @ (Vh_r.T @ Q[1]).T + tail(W, r)  # U_r Q_U Σ_r (V_r Q_V)ᵀ + tail
    check_forward(layer, W_prime)
    assert not (layer.lora_A.requires_grad or layer.lora_B.requires_grad)
    check_export(layer, r)


def test_spectral_r_trains_r_r_minus_1():
    layer = adapted(svdkit.SpectralAdapterR(rank=8), torch.randn(128, 512))
    assert trainable(layer) == 8 * 7
    assert svdkit.SpectralAdapterR.lr == 1e-5 and svdkit.SpectralAdapterR.weight_decay == 0.1


def test_spectral_r_rejects_rank_1():
    with pytest.raises(ValueError, match="SpectralAdapterR: rank must be >= 2"):
        svdkit.SpectralAdapterR(rank=1)


# -- SALT ------------------------------------------------------------------------------------------------
def test_salt_equation_relu_on_the_whole_core():
    W, r = random_weight(), 3
    cfg = svdkit.SALT(rank=r, top_fraction=0.25, **F64)  # k = 9, t = 2
    layer = adapted(cfg, W)
    U, Vh, core = layer.lora_B, layer.lora_A, layer.core
    sigma = core.sigma
    assert U.shape == (12, 9) and Vh.shape == (9, 9) and core.scale.shape == (2,) and core.X.shape == (7, r)
    torch.testing.assert_close(U @ torch.diag(sigma) @ Vh, W)  # full SVD, W untouched
    torch.testing.assert_close(U.T @ U, torch.eye(9, dtype=W.dtype))
    assert torch.count_nonzero(layer.core()) == 0  # α = 1, β = 0, Y = 0: exactly zero update
    assert torch.all(core.scale == 1) and torch.all(core.shift == 0) and torch.all(core.Y == 0)
    perturb(layer, scale=0.5)
    alpha, beta, X, Y = (p.detach() for p in (core.scale, core.shift, core.X, core.Y))
    S_hat = torch.zeros(9, 9, dtype=W.dtype)
    S_hat[:2, :2] = torch.diag(alpha * sigma[:2] + beta)
    S_hat[2:, 2:] = torch.diag(sigma[2:]) + X @ Y
    assert (S_hat < 0).any()  # the ReLU has work to do
    check_forward(layer, U @ torch.relu(S_hat) @ Vh)
    assert not torch.allclose(layer.merged_weight(), U @ S_hat @ Vh)


def test_salt_kaiming_x_is_seeded_per_layer():
    W = random_weight(32, 16)
    a = svdkit.SALT(rank=4).initialize(W[None], ["a"]).core["X"]
    assert torch.equal(a, svdkit.SALT(rank=4).initialize(W[None], ["a"]).core["X"])
    assert not torch.equal(a, svdkit.SALT(rank=4).initialize(W[None], ["b"]).core["X"])
    assert a.abs().max() <= 1 / math.sqrt(4) and a.abs().max() > 0.3  # U(−1/√r, 1/√r)


@pytest.mark.parametrize("rho,t", [(0.1, 12), (0.01, 1), (0.5, 64)])
def test_salt_trains_2t_plus_2r_k_minus_t(rho, t):
    layer = adapted(svdkit.SALT(rank=8, top_fraction=rho), torch.randn(128, 512))  # k = 128
    assert layer.core.top == t
    assert trainable(layer) == 2 * t + 2 * 8 * (128 - t)


def test_salt_regularizer_matches_formula():
    W = random_weight()
    layer = adapted(svdkit.SALT(rank=3, top_fraction=0.25, reg_multiplier=0.5, **F64), W)
    assert svdkit.SALT(rank=3).regularizer(layer) is None  # reg_multiplier = 0 (default): no term
    cfg = svdkit.SALT(rank=3, top_fraction=0.25, reg_multiplier=0.5, **F64)
    assert float(cfg.regularizer(layer).detach()) == 0  # at init both terms vanish
    perturb(layer)
    c = layer.core
    top = torch.diag(c.scale * c.sigma[:2] + c.shift) - torch.diag(c.sigma[:2])
    expected = 0.5 * (torch.sqrt((top**2).sum()) + torch.sqrt(((c.X @ c.Y) ** 2).sum()))
    reg = cfg.regularizer(layer)
    torch.testing.assert_close(reg, expected)
    reg.backward()
    assert c.shift.grad is not None and c.Y.grad.abs().sum() > 0


def test_salt_regularization_sums_over_a_model():
    model = tiny_model("llama")
    svdkit.adapt(model, svdkit.SALT(rank=2, reg_multiplier=1.0))
    assert float(svdkit.regularization(model).detach()) == 0
    with torch.no_grad():
        for _, layer in svdkit.adapters.api.adapted_layers(model):
            layer.core.shift.add_(1.0)  # ‖β‖ per layer = √t
    expected = sum(math.sqrt(layer.core.top) for _, layer in svdkit.adapters.api.adapted_layers(model))
    assert float(svdkit.regularization(model).detach()) == pytest.approx(expected, rel=1e-5)


def test_salt_refuses_peft_export(tmp_path):
    model = tiny_model("gpt2")
    svdkit.adapt(model, svdkit.SALT(rank=2))
    with pytest.raises(ValueError, match="not low-rank.*merge"):
        svdkit.export_peft(model, tmp_path / "peft")


@pytest.mark.parametrize("options,match", [
    (dict(top_fraction=0.0), r"SALT: top_fraction must be in \(0, 1\]"),
    (dict(top_fraction=1.5), r"SALT: top_fraction must be in \(0, 1\]"),
    (dict(reg_multiplier=-1.0), "SALT: reg_multiplier must be a number >= 0"),
])
def test_salt_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.SALT(**options)


def test_salt_tail_rank_must_fit():
    cfg = svdkit.SALT(rank=8, top_fraction=0.25)  # k = 9, t = 2: at most 7
    with pytest.raises(ValueError, match=r"SALT: rank 8 \(the tail LoRA rank\) must be <= k - t = 9 - 2 = 7"):
        cfg.initialize(random_weight()[None], ["layer"])


# -- pivoted QR (svdkit.core.linalg_qr) ----------------------------------------------------------------------
def rank_deficient(m=10, n=8, r=3) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("W", [random_weight(12, 9), random_weight(9, 12), rank_deficient()], ids=["tall", "wide", "rank3"])
def test_pivoted_qr_definition(W):
    Q, R, perm = pivoted_qr(W, torch.float64)
    k = min(W.shape)
    assert Q.shape == (W.shape[0], k) and R.shape == (k, W.shape[1])
    assert sorted(perm.tolist()) == list(range(W.shape[1]))
    P = torch.eye(W.shape[1], dtype=W.dtype)[:, perm]
    torch.testing.assert_close(W @ P, Q @ R)  # W P = Q R
    torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=W.dtype))
    assert torch.equal(R, torch.triu(R))
    d = R.diagonal().abs()
    assert torch.all(d[1:] <= d[:-1] + 1e-12)  # non-increasing |R_ii|
    assert int(perm[0]) == int(W.norm(dim=0).argmax())  # first pivot: the largest column
    torch.testing.assert_close(d, reference_pivoted_gs(W)[0], atol=1e-10, rtol=1e-8)


def test_pivoted_qr_batched_and_fp32():
    W = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(4))
    Q, R, perm = pivoted_qr(W)
    assert Q.shape == (2, 3, 7, 5) and R.shape == (2, 3, 5, 5) and perm.shape == (2, 3, 5)
    assert Q.dtype == torch.float32 and perm.dtype == torch.int64
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(W[i, j][:, perm[i, j]], Q[i, j] @ R[i, j], atol=1e-5, rtol=1e-5)


# -- QR-LoRA ---------------------------------------------------------------------------------------------
def test_qrlora_equation_unpermutes_r():
    W = torch.zeros(6, 4, dtype=torch.float64)
    W[0, 0], W[1, 1], W[2, 2], W[3, 3] = 2.0, 4.0, 1.0, 3.0  # pivots: columns 1, 3, 0, 2
    layer = adapted(svdkit.QRLoRA(tau=0.65, **F64), W)  # |R_ii| = 4, 3, 2, 1: 4 + 3 ≥ 0.65·10 → r = 2
    assert layer.rank == 2
    with torch.no_grad():
        layer.core.value.copy_(torch.tensor([0.5, -2.0]))
    expected = W.clone()
    expected[1, 1] += 0.5 * 4.0  # λ₁ q₁ r̃₁ᵀ: q₁ = e₁, r̃₁ = 4 e₁ (R's first row, un-permuted)
    expected[3, 3] += -2.0 * 3.0
    check_forward(layer, expected)
    check_export(layer, 2)


def test_qrlora_equation_on_a_random_matrix():
    W = random_weight()
    layer = adapted(svdkit.QRLoRA(tau=0.8, **F64), W)
    r = layer.rank
    assert r == reference_qr_rank(W, 0.8)
    assert torch.count_nonzero(layer.delta_weight()) == 0  # λ = 0
    lam = torch.linspace(-1, 2, r, dtype=W.dtype)
    with torch.no_grad():
        layer.core.value.copy_(lam)
    q = reference_pivoted_gs(W)[1]  # row i of R Pᵀ is q_iᵀ W (W = Q R Pᵀ), so λ_i q_i r̃_iᵀ = λ_i q_i q_iᵀ W
    delta = sum(lam[i] * torch.outer(q[:, i], q[:, i] @ W) for i in range(r))
    check_forward(layer, W + delta)
    with torch.no_grad():  # λ = 1: the update is W projected on span(q_1..q_r), since (R Pᵀ)_{:r} = Q_rᵀ W
        layer.core.value.fill_(1.0)
        Qr = layer.lora_B
        torch.testing.assert_close(layer.delta_weight(), Qr @ Qr.T @ W)
    check_export(layer, r)


def test_qrlora_energy_abs_versus_squared_and_cap():
    W = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    # τ = 0.8: |R_ii| needs 4 + 3 + 2 ≥ 8 (r = 3); R_ii² needs 16 + 9 ≥ 24 (r = 2)
    assert adapted(svdkit.QRLoRA(tau=0.8, **F64), W).rank == 3
    assert adapted(svdkit.QRLoRA(tau=0.8, energy="squared", **F64), W).rank == 2
    assert adapted(svdkit.QRLoRA(tau=0.8, max_rank=1, **F64), W).rank == 1
    assert adapted(svdkit.QRLoRA(tau=1.0, **F64), W).rank == 4


def test_qrlora_trains_r_layer_scalars_on_a_real_shape():
    W = torch.randn(128, 512, generator=torch.Generator().manual_seed(5))
    layer = adapted(svdkit.QRLoRA(), W)
    r = reference_qr_rank(W, 0.9)
    assert layer.rank == r and trainable(layer) == r
    assert 1 < r < 128


def test_qrlora_layers_get_their_own_ranks_in_the_peft_export(tmp_path):
    model = tiny_model("llama")
    svdkit.adapt(model, svdkit.QRLoRA(tau=0.9))
    ranks = {name: layer.rank for name, layer in svdkit.adapters.api.adapted_layers(model)}
    assert len(set(ranks.values())) > 1
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"]
    assert {config["rank_pattern"].get(name.replace(".", r"\."), config["r"]) for name in ranks} == set(ranks.values())


@pytest.mark.parametrize("options,match", [
    (dict(tau=0.0), r"QRLoRA: tau must be in \(0, 1\]"),
    (dict(tau=1.2), r"QRLoRA: tau must be in \(0, 1\]"),
    (dict(energy="sq"), r"QRLoRA: energy must be one of \('abs', 'squared'\)"),
    (dict(max_rank=0), "QRLoRA: max_rank must be a positive integer or None"),
])
def test_qrlora_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.QRLoRA(**options)


def test_qrlora_initializes_one_layer_at_a_time():
    assert svdkit.QRLoRA.batched is False
    with pytest.raises(ValueError, match="one layer at a time"):
        svdkit.QRLoRA().initialize(torch.randn(2, 6, 4), ["a", "b"])
