"""SLoRA / NLoRA / IntTune (METHODS.md §17) and MultiLoRA (§19): each method's defining equation on a small
random matrix against the paper's formula written out here, parameter counts on a real shape, the export
rule (exact rank-r / rank-n·r PEFT LoRA) and bad option values."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import svdkit
from svdkit.adapters.api import adapted_layers

M, N_IN, R = 12, 9, 3


class OneLinear(nn.Module):
    def __init__(self, m: int = M, n: int = N_IN, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(n, m).to(dtype)

    def forward(self, x):
        return self.proj(x)


def adapted(cfg, m: int = M, n: int = N_IN, dtype=torch.float64):
    """(model, its one adapted layer, a copy of the original weight)."""
    model = OneLinear(m, n, dtype)
    W = model.proj.weight.detach().clone()
    svdkit.adapt(model, cfg)
    return model, dict(adapted_layers(model))["proj"], W


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def pinv_by_svd(C: torch.Tensor) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(C)
    return Vh.T @ torch.diag(1.0 / S) @ U.T


def randomize(model, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model).values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def check_forward(model, W_eff: torch.Tensor) -> None:
    """The adapted model computes y = x W_effᵀ + b."""
    x = torch.randn(5, W_eff.shape[1], generator=torch.Generator().manual_seed(1), dtype=W_eff.dtype)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ W_eff.T + model.proj.bias, rtol=1e-10, atol=1e-10)


def f64(**options):
    return dict(targets="proj", compute_dtype="float64", **options)


# -- SLoRA ---------------------------------------------------------------------------------------------
def test_slora_is_kaiming_a_and_n_zero_b_and_computes_b_n_a():
    model, layer, W = adapted(svdkit.SLoRA(rank=R, alpha=6.0, **f64()))
    A, B, Nc = layer.lora_A.detach(), layer.lora_B.detach(), layer.core.value.detach()
    assert A.shape == (R, N_IN) and B.shape == (M, R) and Nc.shape == (R, R)
    assert torch.count_nonzero(B) == 0  # B = 0: function-preserving
    for t, fan_in in ((A, N_IN), (Nc, R)):  # U(±1/√fan_in), and not degenerate
        assert float(t.abs().max()) <= 1 / math.sqrt(fan_in) and float(t.std()) > 0.2 / math.sqrt(fan_in)
    assert {n.rsplit(".", 1)[-1] for n in trainable(model)} == {"lora_A", "lora_B", "value"}
    check_forward(model, W)
    randomize(model)
    A, B, Nc = layer.lora_A.detach(), layer.lora_B.detach(), layer.core.value.detach()
    check_forward(model, W + (6.0 / R) * B @ Nc @ A)  # ΔW = s·B N A, s = α/r


def test_slora_draws_are_per_layer_and_seeded():
    a = adapted(svdkit.SLoRA(rank=R, **f64(seed=1)))[1]
    b = adapted(svdkit.SLoRA(rank=R, **f64(seed=1)))[1]
    c = adapted(svdkit.SLoRA(rank=R, **f64(seed=2)))[1]
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.core.value, b.core.value)
    assert not torch.equal(a.lora_A, c.lora_A) and not torch.equal(a.core.value, c.core.value)


# -- NLoRA / IntTune -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["nlora", "inttune"])
@pytest.mark.parametrize("core", ["pinv", "slice"])
def test_nystrom_init_is_the_first_rows_and_columns(method, core):
    cfg = svdkit.config(method, rank=R, alpha=6.0, nystrom_core=core, preserve_init=False, **f64())
    model, layer, W = adapted(cfg)
    N0 = pinv_by_svd(W[:R, :R]) if core == "pinv" else W[:R, :R]
    torch.testing.assert_close(layer.lora_A, W[:R, :])
    torch.testing.assert_close(layer.lora_B, W[:, :R])
    torch.testing.assert_close(layer.core.value.detach(), N0)
    # not function-preserving: the base keeps all of W and the Nyström term is added on top
    assert layer.init_A is None and layer.init_B is None
    assert torch.equal(model.proj.weight, W)
    check_forward(model, W + (6.0 / R) * W[:, :R] @ N0 @ W[:R, :])


def test_nlora_pinv_core_makes_b_n_a_the_nystrom_approximation():
    """With N = W[:r, :r]⁺ (the paper), B N A = W[:, :r] W[:r, :r]⁺ W[:r, :] reproduces W's first r rows and
    columns exactly and equals W itself when rank(W) = r."""
    _, layer, W = adapted(svdkit.NLoRA(rank=R, nystrom_core="pinv", preserve_init=False, **f64()))
    BNA = layer.delta_weight().detach()  # s = 1
    torch.testing.assert_close(BNA[:R, :], W[:R, :])
    torch.testing.assert_close(BNA[:, :R], W[:, :R])
    g = torch.Generator().manual_seed(4)
    low = torch.randn(M, R, generator=g, dtype=torch.float64) @ torch.randn(R, N_IN, generator=g, dtype=torch.float64)
    model = OneLinear()
    with torch.no_grad():
        model.proj.weight.copy_(low)
    svdkit.adapt(model, svdkit.NLoRA(rank=R, nystrom_core="pinv", preserve_init=False, **f64()))
    torch.testing.assert_close(model.proj.delta_weight().detach(), low)


def test_nlora_trains_a_n_b_and_inttune_only_n():
    nlora, inttune = adapted(svdkit.NLoRA(rank=R, **f64()))[0], adapted(svdkit.IntTune(rank=R, **f64()))[0]
    assert sorted(trainable(nlora)) == ["proj.core.value", "proj.lora_A", "proj.lora_B"]
    assert sorted(trainable(inttune)) == ["proj.core.value"]
    layer = inttune.proj
    A, B = layer.lora_A.clone(), layer.lora_B.clone()
    opt = torch.optim.SGD(list(trainable(inttune).values()), lr=0.1)
    inttune(torch.randn(4, N_IN, dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert torch.equal(layer.lora_A, A) and torch.equal(layer.lora_B, B)  # frozen buffers
    assert layer.core.value.grad is not None and float(layer.core.value.grad.abs().max()) > 0


def test_nlora_compute_dtype_float32_matches_the_float64_formula():
    cfg = svdkit.NLoRA(rank=R, targets="proj", nystrom_core="pinv", preserve_init=False)
    model, layer, W = adapted(cfg, dtype=torch.float32)
    W64 = W.double()
    expected = W64[:, :R] @ pinv_by_svd(W64[:R, :R]) @ W64[:R, :]
    torch.testing.assert_close(layer.delta_weight().detach().double(), expected, rtol=1e-5, atol=1e-5)


# -- MultiLoRA -----------------------------------------------------------------------------------------
def test_multilora_is_a_sum_of_scaled_parallel_loras():
    n_loras, alpha = 4, 6.0
    model, layer, W = adapted(svdkit.MultiLoRA(rank=R, n_loras=n_loras, alpha=alpha, **f64()))
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.core.value.detach()
    assert A.shape == (n_loras * R, N_IN) and B.shape == (M, n_loras * R) and s.shape == (n_loras,)
    assert layer.rank == n_loras * R
    assert torch.count_nonzero(s) == 0  # zero-initialized scales: ΔW = 0 at init
    for t, fan_in in ((A, N_IN), (B, R)):  # both factors kaiming-uniform: U(±1/√fan_in)
        assert float(t.abs().max()) <= 1 / math.sqrt(fan_in) and float(t.std()) > 0.2 / math.sqrt(fan_in)
    check_forward(model, W)
    randomize(model)
    A, B, s = layer.lora_A.detach(), layer.lora_B.detach(), layer.core.value.detach()
    blocks = [slice(i * R, (i + 1) * R) for i in range(n_loras)]
    delta = sum(s[i] * B[:, blk] @ A[blk, :] for i, blk in enumerate(blocks))
    check_forward(model, W + (alpha / R) * delta)


def test_multilora_zero_scales_still_pass_gradient_to_the_scales_only():
    model, layer, _ = adapted(svdkit.MultiLoRA(rank=R, **f64()))
    x = torch.randn(6, N_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model(x).square().sum().backward()
    assert float(layer.core.value.grad.abs().min()) > 0  # every s_i moves
    assert float(layer.lora_A.grad.abs().max()) == 0 and float(layer.lora_B.grad.abs().max()) == 0


def test_multilora_reload_keeps_the_block_size():
    cfg = svdkit.MultiLoRA(rank=2, n_loras=3, targets="proj", overrides={"proj": {"rank": 1}})
    core = cfg.for_module("proj").make_core({"value": torch.tensor([1.0, 2.0, 3.0])})
    assert torch.equal(core(), torch.tensor([1.0, 2.0, 3.0]))  # block = the module's rank (1)
    assert torch.equal(cfg.make_core({"value": torch.tensor([1.0, 2.0])})(), torch.tensor([1.0, 1.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="only 'value'"):
        cfg.make_core({"value": torch.zeros(3), "initial": torch.zeros(3)})


# -- parameter counts on a real shape (SmolLM2-135M's up_proj: 1536 × 576) --------------------------------
@pytest.mark.parametrize("method,options,expected", [
    ("slora", {}, 16 * (1536 + 576) + 16**2),
    ("nlora", {}, 16 * (1536 + 576) + 16**2),
    ("nlora", {"nystrom_core": "pinv"}, 16 * (1536 + 576) + 16**2),
    ("inttune", {}, 16**2),
    ("multilora", {}, 3 * 16 * (1536 + 576) + 3),
    ("multilora", {"n_loras": 5, "rank": 8}, 5 * 8 * (1536 + 576) + 5),
])  # fmt: skip
def test_trainable_parameters_follow_methods_md(method, options, expected):
    cfg = svdkit.config(method, targets="proj", compute_dtype="float32", **{"rank": 16, **options})
    model = adapted(cfg, m=1536, n=576, dtype=torch.float32)[0]
    assert sum(p.numel() for p in trainable(model).values()) == expected


# -- export ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,options,rank", [
    ("slora", {}, R),
    ("nlora", {"preserve_init": False}, R),
    ("inttune", {"nystrom_core": "pinv", "preserve_init": False}, R),
    ("multilora", {"n_loras": 3}, 3 * R),
    ("multilora", {"n_loras": 2, "use_rslora": True, "alpha": 5.0}, 2 * R),
])  # fmt: skip
def test_export_is_an_exact_lora_of_the_stated_rank(method, options, rank, tmp_path):
    model, layer, W = adapted(svdkit.config(method, rank=R, **f64(**options)))
    randomize(model)
    out = svdkit.export_peft(model, tmp_path / "peft")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    A, B = tensors["base_model.model.proj.lora_A.weight"], tensors["base_model.model.proj.lora_B.weight"]
    assert peft_cfg["r"] == rank and A.shape == (rank, N_IN) and B.shape == (M, rank)
    peft_scale = peft_cfg["lora_alpha"] / (math.sqrt(rank) if peft_cfg["use_rslora"] else rank)
    # the update, written from the method's own factors: s·B N A or s·Σ s_i B_i A_i = s·B diag(s ⊗ 1_r) A
    c = layer.core.value.detach()
    middle = c if c.ndim == 2 else torch.diag(c.repeat_interleave(R))
    expected = layer.scaling * layer.lora_B.detach() @ middle @ layer.lora_A.detach()
    torch.testing.assert_close(peft_scale * B @ A, expected)


# -- options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [svdkit.NLoRA, svdkit.IntTune])
@pytest.mark.parametrize("bad", ["qr", "PINV", None])
def test_bad_nystrom_core_is_refused(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: nystrom_core must be 'pinv' .* or 'slice'"):
        cls(nystrom_core=bad)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3"])
def test_bad_n_loras_is_refused(bad):
    with pytest.raises(ValueError, match="MultiLoRA: n_loras .* must be a positive integer"):
        svdkit.MultiLoRA(n_loras=bad)


@pytest.mark.parametrize("method,options", [
    ("nlora", {"nystrom_core": "pinv"}), ("inttune", {"nystrom_core": "pinv"}), ("multilora", {"n_loras": 5}),
])  # fmt: skip
def test_method_options_survive_json(method, options):
    cfg = svdkit.config(method, rank=4, **options)
    assert svdkit.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_defaults():
    assert svdkit.NLoRA().nystrom_core == "slice" and svdkit.IntTune().nystrom_core == "slice"  # METHODS §17
    assert svdkit.MultiLoRA().n_loras == 3
    for cls in (svdkit.SLoRA, svdkit.NLoRA, svdkit.IntTune):
        assert cls.lr == 2e-4 and cls.weight_decay == 0.0 and cls().rank == 16 and cls().scaling == 1.0
