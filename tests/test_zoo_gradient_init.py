"""LoRA-One and LoRA-GA: init equations against direct formulas on a 12×9 matrix with a given gradient G,
LoRA-One's one-GD-step initial weight, LoRA-GA's first-step gradient alignment, the optional preconditioner,
parameter counts, export ranks, and parity with PEFT's LoRA-GA on a tiny Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.adapters.layers import weight_matrix
from svdkit.core.targets import select_targets

from conftest import calibration_batches, model_output, tiny_model

M, N = 12, 9


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, N, generator=g, dtype=torch.float64), torch.randn(M, N, generator=g, dtype=torch.float64)


def init(cfg, W, G, name="layer"):
    """cfg.initialize on one weight with a hand-built calibration {name: {"gradient": G}}."""
    return cfg.initialize(W.float().unsqueeze(0), [name], {name: {"gradient": G.float()}})


def svd64(G):
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U, S, Vh


def aligned(ours: torch.Tensor, ref: torch.Tensor, dim: int) -> torch.Tensor:
    """``ours`` with each vector (columns: dim=0, rows: dim=1) sign-flipped to match ``ref``."""
    signs = torch.sign((ours.double() * ref.double()).sum(dim=dim, keepdim=True))
    return ours.double() * signs


def rank_k(G, k):
    U, S, Vh = svd64(G)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k, :]


def close(a, b, tol=1e-5):
    return float((a.double() - b.double()).abs().max()) <= tol * max(1.0, float(b.double().abs().max()))


# -- LoRA-One ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r,gamma", [(3, 128.0), (5, 16.0)])
def test_lora_one_factors_follow_the_code_formula(r, gamma):
    W, G = problem()
    cfg = svdkit.LoRAOne(rank=r, gamma=gamma)
    out = init(cfg, W, G)
    U, S, Vh = svd64(-G)  # −G = U S Vᵀ
    denom = math.sqrt(float(S[0]) * gamma)
    B_ref = U[:, :r] @ torch.diag(S[:r].sqrt()) / denom
    A_ref = torch.diag(S[:r].sqrt()) @ Vh[:r, :] / denom
    assert close(aligned(out.B[0], B_ref, 0), B_ref) and close(aligned(out.A[0], A_ref, 1), A_ref)
    assert not out.subtract and out.A0 is None and out.B0 is None  # the base is not modified


def test_lora_one_initial_weight_is_the_documented_gd_step():
    """W + s·B₀A₀ (the factor formula) equals W − (α/(√r γ σ₁))·[G]_r (the doc formula), σ₁ = ‖G‖₂."""
    W, G = problem(1)
    cfg = svdkit.LoRAOne(rank=4, alpha=16, gamma=128)
    out = init(cfg, W, G)
    W0 = W + cfg.scaling * (out.B[0].double() @ out.A[0].double())
    sigma1 = float(torch.linalg.matrix_norm(G, ord=2))
    expected = W - 16 / (math.sqrt(4) * 128 * sigma1) * rank_k(G, 4)
    assert close(W0, expected) and not close(W0, W, 1e-3)
    assert cfg.scaling == pytest.approx(16 / math.sqrt(4))  # rsLoRA by default


def test_lora_one_adapted_model_starts_at_the_gd_step_with_real_calibration():
    model = tiny_model("llama")
    cfg = svdkit.LoRAOne(rank=4)
    stats = svdkit.calibrate(model, calibration_batches(), cfg, progress=False)
    assert stats.statistic["kind"] == "gradient"
    originals = {name: weight_matrix(m).detach().clone() for name, m in select_targets(model, cfg.targets)}
    svdkit.adapt(model, cfg, calibration=stats)
    layers = dict(adapted_layers(model))
    assert set(layers) == set(originals)
    for name, layer in layers.items():
        G = stats[name]["gradient"].double()
        sigma1 = float(torch.linalg.matrix_norm(G, ord=2))
        expected = originals[name].double() - cfg.alpha / (math.sqrt(cfg.rank) * cfg.gamma * sigma1) * rank_k(G, cfg.rank)
        merged = originals[name].double() + layer.delta_weight().detach().double()
        assert close(merged, expected), name
        assert torch.equal(weight_matrix(layer), originals[name])  # the base weight is untouched


def test_lora_one_randomized_svd_matches_exact_on_a_low_rank_gradient():
    W, _ = problem()
    g = torch.Generator().manual_seed(3)
    G = torch.randn(M, 4, generator=g, dtype=torch.float64) @ torch.randn(4, N, generator=g, dtype=torch.float64)
    exact = init(svdkit.LoRAOne(rank=3), W, G)
    fast = init(svdkit.LoRAOne(rank=3, svd="randomized", niter=2, oversample=2), W, G)
    again = init(svdkit.LoRAOne(rank=3, svd="randomized", niter=2, oversample=2), W, G)
    assert close(fast.B[0] @ fast.A[0], exact.B[0] @ exact.A[0], 1e-4)
    assert torch.equal(fast.A, again.A) and torch.equal(fast.B, again.B)


def test_lora_one_preconditioner_matches_formula():
    g = torch.Generator().manual_seed(5)
    A = torch.nn.Parameter(torch.randn(3, N, generator=g))
    B = torch.nn.Parameter(torch.randn(M, 3, generator=g))
    gA, gB = torch.randn(3, N, generator=g), torch.randn(M, 3, generator=g)
    A.grad, B.grad = gA.clone(), gB.clone()
    layer = type("Layer", (), {"lora_A": A, "lora_B": B})()
    svdkit.LoRAOne(rank=3).after_clipping({"l": layer}, 2e-4)  # off by default: untouched
    assert torch.equal(A.grad, gA) and torch.equal(B.grad, gB)
    lam = 0.5  # large enough that a missing λI would be visible
    svdkit.LoRAOne(rank=3, precondition=True, prec_reg=lam).after_clipping({"l": layer}, 2e-4)
    a, b, eye = A.detach().double(), B.detach().double(), torch.eye(3, dtype=torch.float64)
    assert close(A.grad, torch.linalg.inv(b.T @ b + lam * eye) @ gA.double())
    assert close(B.grad, gB.double() @ torch.linalg.inv(a @ a.T + lam * eye))


def test_lora_one_zero_gradient_is_a_clear_error():
    W, _ = problem()
    with pytest.raises(ValueError, match="LoRAOne: the calibration gradient of layer is zero"):
        init(svdkit.LoRAOne(rank=2), W, torch.zeros(M, N, dtype=torch.float64))


# -- LoRA-GA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction,a_idx,b_idx", [
    ("ArB2r", [0, 1, 2], [3, 4, 5]), ("A2rBr", [3, 4, 5], [0, 1, 2]), ("ArBr", [1, 3, 5], [0, 2, 4]),
])  # fmt: skip
def test_lora_ga_factors_follow_the_paper(direction, a_idx, b_idx):
    W, G = problem(2)
    cfg = svdkit.LoRAGA(rank=3, gamma=16, direction=direction)
    out = init(cfg, W, G)
    U, S, Vh = svd64(G)
    c = M**0.25 / math.sqrt(16)
    A_ref, B_ref = c * Vh[a_idx, :], c * U[:, b_idx]
    assert close(aligned(out.A[0], A_ref, 1), A_ref) and close(aligned(out.B[0], B_ref, 0), B_ref)
    assert out.subtract  # W_res = W − s·B A: function-preserving, rank-2r export


def test_lora_ga_first_step_follows_the_rank_2r_gradient():
    """For a loss with ∂L/∂W = G, the first-order change of s·BA is −η·s(∇_B A + B ∇_A) = −η s² c² [G]_{2r}."""
    W, G = problem(4)
    cfg = svdkit.LoRAGA(rank=2, alpha=4, gamma=16)
    out = init(cfg, W, G)
    A = out.A[0].double().requires_grad_()
    B = out.B[0].double().requires_grad_()
    s = cfg.scaling
    W_res = W - s * (B @ A).detach()
    loss = ((W_res + s * B @ A) * G).sum()  # linear loss: its full gradient is G
    gA, gB = torch.autograd.grad(loss, (A, B))
    direction = s * (gB @ A + B @ gA).detach()
    c2 = math.sqrt(M) / 16
    assert close(direction, s**2 * c2 * rank_k(G, 4))
    assert close(W_res + s * (B @ A).detach(), W)  # function-preserving


def test_lora_ga_needs_2r_singular_vectors():
    W, G = problem()
    with pytest.raises(ValueError, match=r"LoRAGA: layer \(weight 12×9\) is too small .* rank 5"):
        init(svdkit.LoRAGA(rank=5), W, G)


# -- shared ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,expected_rank", [(svdkit.LoRAOne, 4), (svdkit.LoRAGA, 8)])
def test_parameter_count_and_export_rank(cls, expected_rank, tmp_path):
    model = tiny_model("llama")
    cfg = cls(rank=4, alpha=8)
    shapes = [tuple(weight_matrix(m).shape) for _, m in select_targets(model, cfg.targets)]
    svdkit.adapt(model, cfg, calibration=svdkit.calibrate(model, calibration_batches(), cfg, progress=False))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(4 * (m + n) for m, n in shapes)
    svdkit.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == expected_rank and config["use_rslora"] is True


def test_gradient_shape_and_missing_calibration_errors():
    W, G = problem()
    with pytest.raises(ValueError, match=r"calibration gradient of layer is \(9, 12\) but its weight is 12×9"):
        init(svdkit.LoRAGA(rank=2), W, G.T)
    with pytest.raises(ValueError, match="svdkit.calibrate"):
        svdkit.LoRAOne(rank=2).initialize(W.float().unsqueeze(0), ["layer"], None)


def test_modules_without_gradient_are_excluded_with_a_warning():
    W, G = problem()
    stats = {"a": {"gradient": G}, "b": {"gradient": torch.zeros_like(G)}}
    shapes = {"a": (M, N), "b": (M, N)}
    for cls in (svdkit.LoRAOne, svdkit.LoRAGA):
        cfg = cls(rank=2, exclude="^c$")
        with pytest.warns(UserWarning, match="1 target module"):
            resolved = cfg.resolve(stats, shapes)
        assert resolved.exclude == "(?:^c$)|^b$"
        assert svdkit.config_from_dict(resolved.to_dict()) == resolved
        with pytest.raises(ValueError, match="no gradient to any target"):
            cfg.resolve({"a": {"gradient": torch.zeros_like(G)}}, {"a": (M, N)})
    assert svdkit.LoRAGA(rank=2).resolve({"a": {"gradient": G}}, {"a": (M, N)}) == svdkit.LoRAGA(rank=2)


@pytest.mark.parametrize("cls,options,message", [
    (svdkit.LoRAOne, dict(gamma=0), "LoRAOne: gamma must be a finite number > 0"),
    (svdkit.LoRAOne, dict(prec_reg=-1.0), "LoRAOne: prec_reg must be a finite number > 0"),
    (svdkit.LoRAOne, dict(precondition="yes"), "LoRAOne: precondition must be True or False"),
    (svdkit.LoRAGA, dict(gamma=float("inf")), "LoRAGA: gamma must be a finite number > 0"),
    (svdkit.LoRAGA, dict(direction="BA"), r"LoRAGA: direction must be one of \('ArB2r', 'A2rBr', 'ArBr'\)"),
])  # fmt: skip
def test_bad_options(cls, options, message):
    with pytest.raises(ValueError, match=message):
        cls(**options)


def test_defaults_and_registry():
    one, ga = svdkit.config("lora-one"), svdkit.config("lora-ga")
    assert (one.rank, one.alpha, one.use_rslora, one.gamma, one.precondition, one.prec_reg) == (8, 16, True, 128.0, False, 1e-6)
    assert (ga.rank, ga.alpha, ga.use_rslora, ga.gamma, ga.direction) == (8, 16, True, 16.0, "ArB2r")
    assert one.lr == 2e-4 and one.uses_calibration and ga.uses_calibration
    assert one.statistic().describe() == ga.statistic().describe() == {"kind": "gradient"}


# -- PEFT parity (LoRA-GA) ----------------------------------------------------------------------------
def test_lora_ga_matches_peft_up_to_peft_s_B_factor(ids):
    """Same gradient ⇒ PEFT's A = ours / c and PEFT's B = ours · diag(S_B) (up to sign per vector): PEFT 0.21
    multiplies B by the singular values and scales only B; the paper and the authors' code scale the
    orthonormal vectors on both sides. Both inits reproduce the original model exactly."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig

    r, alpha, gamma = 4, 8, 16
    base = tiny_model("llama")
    with torch.no_grad():
        y0 = model_output(base, ids)
    targets = [(name, m) for name, m in select_targets(base, "attention")]
    grads = {}
    g = torch.Generator().manual_seed(7)
    for name, module in targets:  # rank-(2r+2) gradients with distinct singular values: svd_lowrank is exact
        m, n = module.weight.shape
        U = torch.linalg.qr(torch.randn(m, 2 * r + 2, generator=g)).Q
        V = torch.linalg.qr(torch.randn(n, 2 * r + 2, generator=g)).Q
        grads[name] = U @ torch.diag(torch.linspace(3.0, 0.5, 2 * r + 2)) @ V.T
    ours = tiny_model("llama")
    cfg = svdkit.LoRAGA(rank=r, alpha=alpha, gamma=gamma, targets="attention")
    inits = {name: cfg.initialize(weight_matrix(m).detach().unsqueeze(0), [name], {name: {"gradient": grads[name]}})
             for name, m in select_targets(ours, cfg.targets)}  # fmt: skip

    peft_base = tiny_model("llama")
    for name, module in peft_base.named_modules():
        if name in grads:
            module._peft_loraga_grad = grads[name].clone()
    lcfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable",
                                                                               stable_gamma=gamma))  # fmt: skip
    torch.manual_seed(0)
    peft_model = get_peft_model(peft_base, lcfg).eval()
    with torch.no_grad():
        assert close(model_output(peft_model, ids), y0)
    for name, _ in targets:
        layer = peft_model.base_model.model.get_submodule(name)
        A_peft, B_peft = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        c = layer.base_layer.weight.shape[0] ** 0.25 / math.sqrt(gamma)
        S_B = svd64(grads[name])[1][r : 2 * r]
        A_ours, B_ours = inits[name].A[0], inits[name].B[0]
        assert close(aligned(A_ours / c, A_peft, 1), A_peft, 1e-4), name
        assert close(aligned(B_ours * S_B.float(), B_peft, 0), B_peft, 1e-4), name
    svdkit.adapt(ours, cfg, calibration=given_gradients(ours, cfg, grads))
    with torch.no_grad():
        assert close(model_output(ours, ids), y0)


def given_gradients(model, cfg, grads) -> svdkit.Calibration:
    """A Calibration holding the given gradients (fingerprints from the model, so adapt's checks pass)."""
    from svdkit.core.fingerprint import tensor_fingerprint

    prints = {name: tensor_fingerprint(weight_matrix(m)) for name, m in select_targets(model, cfg.targets)}
    return svdkit.Calibration(cfg.statistic().describe(), {k: {"gradient": v} for k, v in grads.items()}, aliases={},
                              fingerprints=prints, samples=1, tokens=1, batches=1)  # fmt: skip
