"""CorDA (METHODS.md §10) against its defining equations, written out here, and against PEFT's CorDA.

C̃ = C + δ·mean(diag C)·I (δ = 0.01, doubling while ‖C̃C̃⁻¹ − I‖_F ≥ 0.05), W C̃ = U Σ V̂ᵀ, W = U Σ (V̂ᵀC̃⁻¹);
IPA adapts the top-r triplets, KPA the bottom-r: B = U_r √(Σ_r/s), A = √(Σ_r/s)(V̂ᵀC̃⁻¹)_r, W_res = W − s·B A.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.core.covariance import covariance_svd, damped_covariance

from conftest import VOCAB, perturb_adapters, tiny_model

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def known_covariance(n: int, rows: int, seed: int = 0) -> torch.Tensor:
    """An anisotropic covariance XᵀX/N (features with very different scales), fp64."""
    X = torch.randn(rows, n, generator=GEN(seed), dtype=torch.float64) * torch.logspace(0, 1.5, n, dtype=torch.float64)
    return X.T @ X / rows


def reference(W: torch.Tensor, C: torch.Tensor, rank: int, top: bool, delta: float = 0.01):
    """The paper's prescription, directly: (U_idx, Σ_idx, (V̂ᵀC̃⁻¹)_idx, C̃) in fp64."""
    n = C.shape[0]
    Ct = C + delta * C.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W.double() @ Ct, full_matrices=False)
    idx = slice(0, rank) if top else slice(S.shape[0] - rank, S.shape[0])
    return U[:, idx], S[idx], (Vh @ torch.linalg.inv(Ct))[idx], Ct


def init_for(cfg, W: torch.Tensor, C: torch.Tensor, name: str = "layer"):
    """cfg.initialize on one weight, with a stand-in calibration {name: {"covariance": C}}."""
    return cfg.initialize(W.unsqueeze(0), [name], {name: {"covariance": C}})


def batches(n_seq: int = 8, length: int = 16, seed: int = 0) -> list[dict]:
    """Random token sequences, one per batch (PEFT's CorDA hook needs batches of one sequence)."""
    ids = torch.randint(0, VOCAB, (n_seq, length), generator=GEN(seed))
    return [{"input_ids": ids[i : i + 1]} for i in range(n_seq)]


def adapted_corda(model, cfg, data=None):
    return svdkit.adapt(model, cfg, calibration=svdkit.calibrate(model, data or batches(), cfg))


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("alpha", [None, 8])
def test_corda_factors_are_the_covariance_oriented_svd(mode, alpha):
    W = torch.randn(12, 9, generator=GEN(1))
    C = known_covariance(9, 30)
    cfg = svdkit.CorDA(rank=3, mode=mode, alpha=alpha, compute_dtype="float64")
    init = init_for(cfg, W, C)
    U, S, VC, _ = reference(W, C, 3, top=mode == "ipa")
    s = cfg.scaling
    B, A = init.B[0], init.A[0]
    assert B.shape == (12, 3) and A.shape == (3, 9) and init.subtract  # function-preserving residual
    torch.testing.assert_close(s * B @ A, U @ torch.diag(S) @ VC, atol=1e-10, rtol=1e-9)
    root = (S / s).sqrt()
    signs = torch.sign((B * U).sum(0))  # each (u_i, v̂_i) pair is determined up to a joint sign
    torch.testing.assert_close(B, U * root * signs, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(A, (root * signs)[:, None] * VC, atol=1e-10, rtol=1e-9)


def test_full_rank_covariance_svd_reconstructs_w_and_ipa_plus_kpa_is_w():
    W = torch.randn(12, 9, generator=GEN(2), dtype=torch.float64)
    Ct, Ci, delta = damped_covariance(known_covariance(9, 30))
    assert delta == 0.01
    U, S, VC = covariance_svd(W, Ct, Ci, rank=9)
    torch.testing.assert_close(U @ torch.diag(S) @ VC, W, atol=1e-11, rtol=0)  # W = U Σ (V̂ᵀC̃⁻¹)
    top, bottom = covariance_svd(W, Ct, Ci, 5, "top"), covariance_svd(W, Ct, Ci, 4, "bottom")
    parts = sum(u @ torch.diag(s) @ v for u, s, v in (top, bottom))
    torch.testing.assert_close(parts, W, atol=1e-11, rtol=0)
    assert float(top[1].min()) >= float(bottom[1].max())
    # the rows of V̂ᵀC̃⁻¹ are not orthonormal (METHODS.md §10 h)
    assert not torch.allclose(VC @ VC.T, torch.eye(9, dtype=torch.float64), atol=1e-3)


def test_ipa_adapts_the_largest_and_kpa_the_smallest_components_of_w_c():
    W = torch.randn(12, 9, generator=GEN(3))
    C = known_covariance(9, 30)
    _, _, _, Ct = reference(W, C, 3, top=True)
    sigma = torch.linalg.svdvals(W.double() @ Ct)
    for mode, expected in (("ipa", sigma[:3]), ("kpa", sigma[-3:])):
        cfg = svdkit.CorDA(rank=3, mode=mode, compute_dtype="float64")
        init = init_for(cfg, W, C)
        delta = cfg.scaling * init.B[0] @ init.A[0]
        got = torch.linalg.svdvals(delta @ Ct)[:3]  # (s·B A) C̃ = U_r Σ_r V̂_rᵀ
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-9)
    # the covariance changes the subspace: IPA's output basis is not the weight's own top-r (PiSSA's)
    pissa = svdkit.PiSSA(rank=3, compute_dtype="float64").initialize(W.unsqueeze(0), ["layer"])
    corda = init_for(svdkit.CorDA(rank=3, compute_dtype="float64"), W, C)
    cos = torch.linalg.svdvals(torch.linalg.qr(pissa.B[0]).Q.T @ torch.linalg.qr(corda.B[0]).Q)
    assert float(cos.min()) < 0.99


def test_singular_covariance_is_damped_once_without_a_warning():
    C = known_covariance(9, 3)  # 3 samples, 9 features: rank 3
    assert int(torch.linalg.matrix_rank(C)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ct, Ci, delta = damped_covariance(C, "layer")
        init = init_for(svdkit.CorDA(rank=2, compute_dtype="float64"), torch.randn(12, 9, generator=GEN(4)), C)
    assert delta == 0.01
    torch.testing.assert_close(Ct, C + 0.01 * C.diagonal().mean() * torch.eye(9, dtype=torch.float64), atol=0, rtol=0)
    assert float(torch.linalg.matrix_norm(Ct @ Ci - torch.eye(9, dtype=torch.float64))) < 0.05
    assert torch.isfinite(init.A).all() and torch.isfinite(init.B).all()


def indefinite_covariance() -> tuple[torch.Tensor, float]:
    """A symmetric 9×9 "covariance" with eigenvalues (1 × 8, x), x < 0 chosen so that C + 0.01·μ·I is indefinite
    and C + 0.02·μ·I is positive definite (μ = mean diag C = (8 + x)/9): the damping must double once."""
    x = -0.015 * 8 / 9
    Q = torch.linalg.qr(torch.randn(9, 9, generator=GEN(5), dtype=torch.float64)).Q
    C = Q @ torch.diag(torch.tensor([1.0] * 8 + [x], dtype=torch.float64)) @ Q.T
    mu = (8 + x) / 9
    assert x + 0.01 * mu < -1e-3 and x + 0.02 * mu > 1e-3
    return C, mu


def test_indefinite_covariance_doubles_the_damping_and_warns_naming_the_layer():
    C, mu = indefinite_covariance()
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.up_proj.*raised from 0\.01 to 0\.02"):
        Ct, _, delta = damped_covariance(C, "model.layers.0.mlp.up_proj")
    assert delta == 0.02
    torch.testing.assert_close(Ct, C + 0.02 * mu * torch.eye(9, dtype=torch.float64), atol=1e-12, rtol=0)
    assert float(torch.linalg.eigvalsh(Ct).min()) > 0
    W = torch.randn(12, 9, generator=GEN(6))
    with pytest.warns(UserWarning, match="blocks.3.fc"):  # through the method, once for this layer
        init = init_for(svdkit.CorDA(rank=3, compute_dtype="float64"), W, C, "blocks.3.fc")
    U, S, VC, _ = reference(W, C, 3, top=True, delta=0.02)
    torch.testing.assert_close(init.B[0] @ init.A[0], U @ torch.diag(S) @ VC, atol=1e-9, rtol=1e-8)


def test_custom_damping_start_and_tolerance():
    C, mu = indefinite_covariance()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Ct, _, delta = damped_covariance(C, "layer", damping=0.03)  # already positive definite: no doubling
    assert delta == 0.03
    with pytest.raises(ValueError, match="layer: the input covariance could not be damped"):
        damped_covariance(C, "layer", tol=0.0)  # an unreachable tolerance ends in an error, not a loop
    cfg = svdkit.CorDA(rank=2, damping=0.03, compute_dtype="float64")
    W = torch.randn(12, 9, generator=GEN(7))
    U, S, VC, _ = reference(W, C, 2, top=True, delta=0.03)
    init = init_for(cfg, W, C)
    torch.testing.assert_close(init.B[0] @ init.A[0], U @ torch.diag(S) @ VC, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(9, 9, dtype=torch.float64), r"model\.layers\.1\.self_attn\.o_proj.*never saw a calibration token"),
    (torch.full((9, 9), float("nan"), dtype=torch.float64), r"o_proj.*NaN/Inf"),
    (torch.eye(8, dtype=torch.float64), r"o_proj.*shape \(8, 8\).*9 input features"),
    (-torch.eye(9, dtype=torch.float64), r"o_proj.*non-positive mean diagonal"),
])  # fmt: skip
def test_unusable_covariances_get_clear_errors_naming_the_module(bad, match):
    with pytest.raises(ValueError, match=match):
        init_for(svdkit.CorDA(rank=2), torch.randn(12, 9, generator=GEN(8)), bad, "model.layers.1.self_attn.o_proj")


def test_initialize_without_calibration_says_how_to_calibrate():
    with pytest.raises(ValueError, match=r"svdkit\.calibrate"):
        svdkit.CorDA(rank=2).initialize(torch.randn(1, 12, 9), ["layer"], None)


@pytest.mark.parametrize("options,match", [
    (dict(mode="ipm"), r"mode must be 'ipa' \(top-r\) or 'kpa' \(bottom-r\).*PEFT's 'ipm' is mode='ipa'"),
    (dict(mode="kpm"), r"PEFT's 'kpm' is mode='kpa'"),
    (dict(mode="top"), r"CorDA: mode must be"),
    (dict(damping=0.0), r"CorDA: damping must be a positive number"),
    (dict(damping=-0.01), r"damping must be a positive number"),
    (dict(damping_tol=0), r"CorDA: damping_tol must be a positive number"),
])  # fmt: skip
def test_corda_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.CorDA(**options)


def test_defaults_statistic_and_json_round_trip():
    from svdkit.core.statistics import InputCovariance

    cfg = svdkit.CorDA()
    assert (cfg.mode, cfg.damping, cfg.damping_tol, cfg.rank, cfg.scaling) == ("ipa", 0.01, 0.05, 16, 1.0)
    assert cfg.uses_calibration and cfg.lr == 2e-5 and cfg.weight_decay == 0.0 and cfg.calibration_samples == 256
    assert cfg.statistic() == InputCovariance(scale="max")
    kpa = svdkit.config("corda", mode="kpa", damping=0.02)
    assert svdkit.config_from_dict(json.loads(json.dumps(kpa.to_dict()))) == kpa


def test_randomized_svd_option_finds_the_same_top_subspace():
    W = torch.randn(40, 30, generator=GEN(9))
    W[:, :4] *= 20  # a clear gap after the top components of W C̃
    C = known_covariance(30, 100)
    exact = init_for(svdkit.CorDA(rank=4, compute_dtype="float64"), W, C)
    fast = init_for(svdkit.CorDA(rank=4, svd="randomized", niter=6, compute_dtype="float64"), W, C)
    torch.testing.assert_close(fast.B[0] @ fast.A[0], exact.B[0] @ exact.A[0], atol=1e-6, rtol=1e-6)


def test_parameter_count_on_a_real_shape():
    cfg = svdkit.CorDA(rank=16)
    init = init_for(cfg, torch.randn(1536, 576, generator=GEN(10)), known_covariance(576, 700))
    assert init.A.shape == (1, 16, 576) and init.B.shape == (1, 1536, 16)
    assert init.trainable == frozenset({"A", "B"})
    assert init.A[0].numel() + init.B[0].numel() == 16 * (1536 + 576)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_adapt_is_function_preserving_counts_r_m_plus_n_and_exports_rank_2r(mode, ids, tmp_path):
    from peft import PeftModel

    model = tiny_model("llama")
    shapes = [tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith(tuple(LLAMA_TARGETS))]
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
    adapted_corda(model, svdkit.CorDA(rank=4, alpha=8, mode=mode))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, y0, atol=1e-5, rtol=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(4 * (m + n) for m, n in shapes)
    perturb_adapters(model)
    with torch.no_grad():
        y = model(input_ids=ids).logits
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # rank 2r: [A; A₀], [B, −B₀]; s = α/r unchanged
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, y, atol=1e-4, rtol=0)


def _peft_corda(base, data, mode: str, rank: int, alpha: float):
    pytest.importorskip("attr", reason="peft.tuners.lora.corda imports the attrs package")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model = copy.deepcopy(base)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=LLAMA_TARGETS, init_lora_weights="corda",
                        lora_dropout=0.0, corda_config=CordaConfig(corda_method={"ipa": "ipm", "kpa": "kpm"}[mode]))  # fmt: skip
    preprocess_corda(model, config, run_model=lambda: [model(**batch) for batch in data])
    return get_peft_model(model, config)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_corda_is_peft_corda(mode, ids):
    """Same calibration sequences: the same adapter subspace, the same B·A (PEFT works in fp32, svdkit in fp64),
    the same residual and the same function."""
    base, data = tiny_model("llama"), batches()
    theirs = _peft_corda(base, data, mode, rank=4, alpha=8)
    ours = adapted_corda(copy.deepcopy(base), svdkit.CorDA(rank=4, alpha=8, mode=mode), data)
    layers = dict(adapted_layers(ours))
    assert len(layers) == 14
    for name, layer in layers.items():
        peft_layer = theirs.get_submodule(f"base_model.model.{name}")
        B, A = peft_layer.lora_B["default"].weight.detach(), peft_layer.lora_A["default"].weight.detach()
        assert peft_layer.scaling["default"] == layer.scaling
        ours_BA, theirs_BA = (layer.lora_B @ layer.lora_A).detach(), B @ A
        assert float((ours_BA - theirs_BA).norm() / theirs_BA.norm()) < 1e-3, name
        for mine, peft_factor in ((layer.lora_B.detach(), B), (layer.lora_A.detach().T, A.T)):  # principal angles
            cos = torch.linalg.svdvals(torch.linalg.qr(mine).Q.T @ torch.linalg.qr(peft_factor).Q)
            assert float(cos.min()) > 1 - 1e-5, name
        W_res = (layer.weight - layer.scaling * layer.init_B @ layer.init_A).detach()
        torch.testing.assert_close(peft_layer.base_layer.weight.detach(), W_res, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-4, rtol=0)
