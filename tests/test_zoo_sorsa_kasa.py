"""SORSA, Effort, KaSA and SoMA (METHODS.md §5, §4, §9, §3) against their defining equations, written out here.

SORSA / Effort: W' = W − s·U₀ diag(σ₀) V₀ᵀ + s·U diag(σ) Vᵀ with U, σ, V trainable (top-r / bottom-r),
SORSA's gradient-added orthonormality regularizer and Effort's two optional loss terms; KaSA:
W' = W − U_tail Σ_tail V_tailᵀ + s·B diag(d) A with its β/γ loss; SoMA: MiLoRA's bottom-r residual init.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters.api import adapted_layers

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def linear_model(*layers: tuple[int, int], seed: int = 0) -> nn.Sequential:
    """nn.Sequential of Linear(in, out) with random weights and non-zero biases."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(n, m) for n, m in layers])
    with torch.no_grad():
        for layer in model:
            layer.bias.normal_(0, 0.1)
    return model


def svd64(W: torch.Tensor):
    return torch.linalg.svd(W.detach().double(), full_matrices=False)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    g = GEN(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def factors(layer):
    """(U, σ, Vᵀ) as the layer holds them now (B, C, A)."""
    return layer.lora_B.detach().double(), layer.core.value.detach().double(), layer.lora_A.detach().double()


def output_is(layer, W_eff: torch.Tensor, bias: torch.Tensor) -> bool:
    x = torch.randn(5, W_eff.shape[1], generator=GEN(7))
    with torch.no_grad():
        y = layer(x)
    return close(y, x.double() @ W_eff.double().T + bias.double())


# -- SORSA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
@pytest.mark.parametrize("alpha", [None, 6.0])
def test_sorsa_trains_principal_u_sigma_v_with_undivided_sigma(shape, alpha):
    m, n = shape
    model = linear_model((n, m))
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    cfg = svdkit.SORSA(rank=3, alpha=alpha)
    s = 1.0 if alpha is None else alpha / 3
    svdkit.adapt(model, cfg)
    layer = model[0]
    U, S, Vh = svd64(W)
    U_p, S_p, Vh_p = U[:, :3], S[:3], Vh[:3]
    B, sigma, A = factors(layer)
    assert close(sigma, S_p)  # σ itself, not σ/s (PiSSA would split √(σ/s) into both factors)
    assert close(B @ B.T, U_p @ U_p.T) and close(A.T @ A, Vh_p.T @ Vh_p)  # the principal subspaces
    assert {name for name, _ in layer.adapter_parameters()} == {"lora_A", "lora_B", "core.value"}
    assert layer.scaling == s
    W_r = W.double() - s * (U_p * S_p) @ Vh_p  # the paper's frozen residual
    assert output_is(layer, W_r + s * (B * sigma) @ A, b)  # = W at init
    assert output_is(layer, W, b)
    perturb(model)
    B, sigma, A = factors(layer)
    assert not close(B * sigma @ A, (U_p * S_p) @ Vh_p)
    assert output_is(layer, W_r + s * (B * sigma) @ A, b)


def test_sorsa_parameter_count_on_a_real_shape():
    model = linear_model((1536, 576))  # SmolLM2 down_proj: 576 × 1536
    svdkit.adapt(model, svdkit.SORSA(rank=8))
    assert trainable(model) == 8 * (576 + 1536 + 1)


def sorsa_reference_grads(layers, gamma: float, peak_lr: float) -> dict:
    """(γ/η_max)·∇L_o with L_o = (1/2L) Σ ‖UᵀU − I‖_F + ‖AAᵀ − I‖_F (the official code: the mean over the
    2L factor matrices), by the closed form
    ∇_X ‖XᵀX − I‖_F = 2X(XᵀX − I)/‖XᵀX − I‖_F (columns) and ∇_A ‖AAᵀ − I‖_F = 2(AAᵀ − I)A/‖·‖ (rows)."""
    out, scale = {}, gamma / peak_lr / (2 * len(layers))
    for name, layer in layers.items():
        B, A = layer.lora_B.detach().double(), layer.lora_A.detach().double()
        EB = B.T @ B - torch.eye(B.shape[1], dtype=B.dtype)
        EA = A @ A.T - torch.eye(A.shape[0], dtype=A.dtype)
        out[name] = (scale * 2 * B @ EB / EB.norm(), scale * 2 * EA @ A / EA.norm())
    return out


def test_sorsa_adds_the_scaled_regularizer_gradient_after_clipping():
    model = linear_model((9, 12), (12, 9))
    cfg = svdkit.SORSA(rank=3, gamma=0.3)
    svdkit.adapt(model, cfg)
    perturb(model, scale=0.2)
    layers = dict(adapted_layers(model))
    g = GEN(3)
    before = {}
    for name, layer in layers.items():
        layer.lora_B.grad = torch.randn(layer.lora_B.shape, generator=g)
        layer.core.value.grad = torch.randn(layer.core.value.shape, generator=g)
        before[name] = (layer.lora_B.grad.clone(), layer.core.value.grad.clone())
        layer.lora_A.grad = None  # no task gradient: the regularizer's becomes the gradient
    expected = sorsa_reference_grads(layers, 0.3, 2e-3)
    svdkit.after_clipping(model, 2e-3)
    for name, layer in layers.items():
        dB, dA = expected[name]
        assert close(layer.lora_B.grad - before[name][0], dB, 1e-4)
        assert close(layer.lora_A.grad, dA, 1e-4)
        assert torch.equal(layer.core.value.grad, before[name][1])  # σ is not in L_o
        assert float(dB.abs().max()) > 1e-3  # the check above is not vacuous


def test_sorsa_regularizer_is_off_at_gamma_zero_and_not_a_loss_term():
    model = linear_model((9, 12))
    svdkit.adapt(model, svdkit.SORSA(rank=3, gamma=0.0))
    perturb(model, scale=0.2)
    layer = model[0]
    layer.lora_B.grad = torch.ones_like(layer.lora_B)
    svdkit.after_clipping(model, 1e-3)
    assert torch.equal(layer.lora_B.grad, torch.ones_like(layer.lora_B)) and layer.lora_A.grad is None
    assert float(svdkit.regularization(model)) == 0.0  # added to gradients, never to the loss


@pytest.mark.parametrize("options,match", [
    (dict(gamma=-1.0), "SORSA: gamma must be a finite number >= 0"),
    (dict(gamma=float("nan")), "SORSA: gamma must be a finite number >= 0"),
    (dict(gamma="4e-4"), "SORSA: gamma must be a finite number >= 0"),
])  # fmt: skip
def test_sorsa_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.SORSA(**options)


def test_sorsa_needs_a_positive_peak_lr():
    model = linear_model((9, 12))
    svdkit.adapt(model, svdkit.SORSA(rank=2))
    with pytest.raises(ValueError, match="peak learning rate must be > 0"):
        svdkit.after_clipping(model, 0.0)


# -- Effort --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])
@pytest.mark.parametrize("rank", [1, 3])
def test_effort_freezes_principal_and_trains_the_last_components(shape, rank):
    m, n = shape
    model = linear_model((n, m))
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    cfg = svdkit.Effort() if rank == 1 else svdkit.Effort(rank=rank)
    assert cfg.rank == rank
    svdkit.adapt(model, cfg)
    layer = model[0]
    U, S, Vh = svd64(W)
    k = min(m, n)
    W_main = (U[:, : k - rank] * S[: k - rank]) @ Vh[: k - rank]  # top k − r, frozen
    B, sigma, A = factors(layer)
    assert close(sigma, S[k - rank :])
    assert close(B * sigma @ A, (U[:, k - rank :] * S[k - rank :]) @ Vh[k - rank :])
    assert output_is(layer, W, b)
    perturb(model)
    B, sigma, A = factors(layer)
    assert output_is(layer, W_main + (B * sigma) @ A, b)


def test_effort_defaults_and_parameter_count_on_a_real_shape():
    cfg = svdkit.Effort()
    assert (cfg.rank, cfg.orth_weight, cfg.norm_weight, cfg.lr, cfg.weight_decay) == (1, 0.0, 0.0, 2e-4, 5e-4)
    model = linear_model((1536, 576))
    svdkit.adapt(model, cfg)
    assert trainable(model) == 576 + 1536 + 1
    assert float(svdkit.regularization(model)) == 0.0  # the released code: cross-entropy only


def effort_reference_loss(W, layer, rank, orth_weight, norm_weight) -> torch.Tensor:
    """½‖[U_main U_res]ᵀ[U_main U_res] − I‖_F + ½‖[V_main V_res]ᵀ[…] − I‖_F and |‖W'‖²_F − ‖W‖²_F|."""
    U, S, Vh = svd64(W)
    k = S.numel()
    B, sigma, A = factors(layer)
    Uf = torch.cat([U[:, : k - rank], B], 1)
    Vf = torch.cat([Vh[: k - rank].T, A.T], 1)
    eye = torch.eye(k, dtype=torch.float64)
    orth = 0.5 * (Uf.T @ Uf - eye).norm() + 0.5 * (Vf.T @ Vf - eye).norm()
    W_new = (U[:, : k - rank] * S[: k - rank]) @ Vh[: k - rank] + (B * sigma) @ A
    keep = (W_new.pow(2).sum() - W.double().pow(2).sum()).abs()
    return orth_weight * orth + norm_weight * keep


@pytest.mark.parametrize("orth_weight,norm_weight", [(1.0, 0.0), (0.0, 1.0), (0.3, 2.0)])
def test_effort_regularizers_follow_the_paper(orth_weight, norm_weight):
    model = linear_model((9, 12), (12, 9))
    weights = [layer.weight.detach().clone() for layer in model]
    svdkit.adapt(model, svdkit.Effort(rank=2, orth_weight=orth_weight, norm_weight=norm_weight))
    perturb(model, scale=0.1)
    expected = [effort_reference_loss(W, layer, 2, orth_weight, norm_weight) for W, layer in zip(weights, model)]
    assert min(float(e) for e in expected) > 1e-2  # a real deviation to measure
    total = svdkit.regularization(model)
    assert close(total, sum(expected), 1e-4)  # summed over layers
    total.backward()  # it trains U and V (orthogonality) and σ (norm keep)
    moved = lambda p: p.grad is not None and float(p.grad.abs().max()) > 0  # noqa: E731
    for layer in model:
        assert moved(layer.lora_A) and moved(layer.lora_B)
        assert moved(layer.core.value) == (norm_weight > 0)


def test_effort_orthogonality_is_zero_at_init_and_stores_the_frozen_bases():
    model = linear_model((9, 12))
    svdkit.adapt(model, svdkit.Effort(rank=2, orth_weight=1.0))
    core = model[0].core
    assert core.U_main.shape == (12, 7) and core.Vh_main.shape == (7, 9)  # k − r = 7 principal components
    assert not core.U_main.requires_grad and float(svdkit.regularization(model).detach()) < 1e-5


@pytest.mark.parametrize("options,match", [
    (dict(orth_weight=-0.1), "Effort: orth_weight must be a finite number >= 0"),
    (dict(norm_weight=float("inf")), "Effort: norm_weight must be a finite number >= 0"),
    (dict(rank=0), "Effort: rank must be a positive integer"),
])  # fmt: skip
def test_effort_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.Effort(**options)


# -- KaSA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, truncate, tail", [
    ((12, 9), "code", 2), ((12, 9), "paper", 2),  # out ≥ in: both keep k − r = in − r
    ((5, 12), "paper", 2), ((5, 12), "code", 0),  # out < in by 7 ≥ r: the released code keeps in − r ≥ k, i.e. all
    ((11, 12), "code", 1),  # out < in by 1: the code keeps in − r = 10 of k = 11 components
])  # fmt: skip
def test_kasa_truncates_the_tail_and_learns_b_diag_d_a(shape, truncate, tail):
    m, n = shape
    model = linear_model((n, m))
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    r = 2
    svdkit.adapt(model, svdkit.KaSA(rank=r, alpha=6.0, truncate=truncate))
    layer = model[0]
    U, S, Vh = svd64(W)
    k = min(m, n)
    W_trunc = W.double() - (U[:, k - tail :] * S[k - tail :]) @ Vh[k - tail :]
    assert torch.linalg.matrix_rank(W_trunc).item() == k - tail
    assert torch.equal(layer.weight, model[0].weight) and close(layer.original_weight(), W)  # W is not written
    B, d, A = factors(layer)
    assert torch.equal(B, torch.zeros_like(B)) and float(A.abs().max()) <= 1 / math.sqrt(n)
    assert float(A.std()) > 0.5 / math.sqrt(3 * n) and float(d.abs().max()) > 0  # kaiming-uniform A, d ~ N(0, 1)
    assert output_is(layer, W_trunc, b)
    perturb(model)
    B, d, A = factors(layer)
    assert output_is(layer, W_trunc + 3.0 * (B * d) @ A, b)  # s = α/r = 3


def test_kasa_random_factors_are_seeded_per_layer():
    a, b = linear_model((9, 12), (12, 9)), linear_model((9, 12), (12, 9))
    svdkit.adapt(a, svdkit.KaSA(rank=2))
    svdkit.adapt(b, svdkit.KaSA(rank=2, seed=1))
    assert not torch.equal(a[0].core.value, a[1].core.value)  # different layers, different draws
    assert not torch.equal(a[0].lora_A, b[0].lora_A)  # another seed, other draws


def test_kasa_parameter_count_on_a_real_shape():
    model = linear_model((576, 192))  # SmolLM2 k_proj: 192 × 576
    svdkit.adapt(model, svdkit.KaSA(rank=8))
    assert trainable(model) == 8 * (192 + 576 + 1)


def test_kasa_regularizer_is_summed_over_layers():
    model = linear_model((9, 12), (12, 9))
    svdkit.adapt(model, svdkit.KaSA(rank=3, beta=0.2, gamma=0.05))
    perturb(model, scale=0.3)
    expected = []
    for layer in model:
        B, d, A = factors(layer)
        eye = torch.eye(3, dtype=torch.float64)
        expected.append(0.2 * d.pow(2).sum() + 0.05 * ((B.T @ B - eye).norm() + (A @ A.T - eye).norm()))
    total = svdkit.regularization(model)
    assert close(total, sum(expected)) and not close(total, sum(expected) / 2)


def test_kasa_regularizer_gradient_at_init():
    """At init B = 0: ‖BᵀB − I‖ = √r with zero gradient in B; β‖d‖² pulls d towards 0."""
    model = linear_model((9, 12))
    svdkit.adapt(model, svdkit.KaSA(rank=3, beta=1.0, gamma=1.0))
    layer = model[0]
    A, d = layer.lora_A.detach().double(), layer.core.value.detach().double()
    eye = torch.eye(3, dtype=torch.float64)
    assert close(svdkit.regularization(model), d.pow(2).sum() + math.sqrt(3) + (A @ A.T - eye).norm())
    svdkit.regularization(model).backward()
    assert float(layer.lora_B.grad.abs().max()) == 0.0 and close(layer.core.value.grad, 2 * d)


@pytest.mark.parametrize("options,match", [
    (dict(beta=-1e-4), "KaSA: beta must be a finite number >= 0"),
    (dict(gamma=float("inf")), "KaSA: gamma must be a finite number >= 0"),
    (dict(gamma=None), "KaSA: gamma must be a finite number >= 0"),
])  # fmt: skip
def test_kasa_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.KaSA(**options)


def test_kasa_rejects_an_unknown_truncation_rule():
    with pytest.raises(ValueError, match="KaSA: truncate must be 'code'.*or 'paper'"):
        svdkit.KaSA(truncate="all")


# -- SoMA ----------------------------------------------------------------------------------------
def test_soma_is_milora_math_with_somas_defaults():
    cfg = svdkit.SoMA()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.lr, cfg.weight_decay) == (16, None, 0.0, 1e-4, 0.05)
    assert svdkit.SoMA(rank=4).scaling == 1.0  # α = r: s = 1 at every rank (not α fixed at 16)
    model = linear_model((9, 12))
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    svdkit.adapt(model, svdkit.SoMA(rank=4))
    layer = model[0]
    U, S, Vh = svd64(W)
    BA = layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    assert close(BA, (U[:, -4:] * S[-4:]) @ Vh[-4:])  # s·B A = the bottom-4 part of W (s = 1)
    assert close(layer.lora_B.detach().double().norm(dim=0), S[-4:].sqrt())  # B = U √(Σ/s)
    assert output_is(layer, W, b) and trainable(model) == 4 * (9 + 12)
    milora = linear_model((9, 12))
    svdkit.adapt(milora, svdkit.MiLoRA(rank=4, dropout=0.0))
    assert torch.equal(milora[0].lora_A, layer.lora_A) and torch.equal(milora[0].lora_B, layer.lora_B)


def test_pissa_and_milora_defaults_are_unchanged():
    assert (svdkit.MiLoRA().dropout, svdkit.MiLoRA().alpha, svdkit.PiSSA().alpha) == (0.05, None, None)


# -- export: exact rank-2r LoRAs relative to the original weights ---------------------------------
@pytest.mark.parametrize("cfg", [svdkit.SORSA(rank=3), svdkit.Effort(rank=2), svdkit.KaSA(rank=3, alpha=6.0, truncate="paper"),
                                 svdkit.SoMA(rank=3)], ids=["sorsa", "effort", "kasa", "soma"])  # fmt: skip
def test_export_is_an_exact_rank_2r_lora(cfg, tmp_path):
    from safetensors.torch import load_file

    model = linear_model((9, 12), (12, 9))
    originals = [layer.weight.detach().clone() for layer in model]
    svdkit.adapt(model, cfg)
    perturb(model)
    merged = [layer.merged_weight().detach().clone() for layer in model]
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert config["r"] == 2 * cfg.rank and config["lora_alpha"] / config["r"] == pytest.approx(cfg.scaling)
    for i, (W0, W1) in enumerate(zip(originals, merged)):
        A, B = tensors[f"base_model.model.{i}.lora_A.weight"], tensors[f"base_model.model.{i}.lora_B.weight"]
        assert A.shape[0] == 2 * cfg.rank
        assert close(W0 + cfg.scaling * B @ A, W1)  # relative to the original W, not the residual


def test_kasa_code_rule_exports_rank_r_where_nothing_is_discarded(tmp_path):
    """Linear(12→9): out < in by 3 = r, so the released code's rule keeps all 9 components: a plain rank-r LoRA,
    written through PEFT's rank_pattern next to the rank-2r layer."""
    from safetensors.torch import load_file

    model = linear_model((9, 12), (12, 9))
    originals = [layer.weight.detach().clone() for layer in model]
    cfg = svdkit.KaSA(rank=3, alpha=6.0)
    svdkit.adapt(model, cfg)
    perturb(model)
    merged = [layer.merged_weight().detach().clone() for layer in model]
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ranks = [tensors[f"base_model.model.{i}.lora_A.weight"].shape[0] for i in range(2)]
    assert ranks == [6, 3]
    for i, (W0, W1) in enumerate(zip(originals, merged)):
        A, B = tensors[f"base_model.model.{i}.lora_A.weight"], tensors[f"base_model.model.{i}.lora_B.weight"]
        r = config["rank_pattern"].get(str(i), config["r"])
        alpha = config["alpha_pattern"].get(str(i), config["lora_alpha"])
        assert r == ranks[i] and close(W0 + alpha / r * B @ A, W1)
