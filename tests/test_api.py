"""Configs, target selection, the methods' defining equations, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.adapters.layers import weight_matrix
from svdkit.core.targets import select_targets

from conftest import model_output, tiny_model


# -- configs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", svdkit.methods())
def test_config_json_round_trip(name):
    extra = {"target_r": 2} if name in ("adalora", "lingo") else {}  # the budget must fit the smallest per-module rank
    cfg = svdkit.config(name, rank=8, alpha=4.0, targets=("q_proj", "v_proj"), seed=3,
                        overrides={"v_proj": {"rank": 2}}, **extra)  # fmt: skip
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["_type"] == name and data["_version"] == 1
    assert svdkit.config_from_dict(data) == cfg
    assert type(svdkit.config_from_dict(data)) is type(cfg)


def test_config_by_name_equals_class():
    assert svdkit.config("pissa", rank=16) == svdkit.PiSSA(rank=16)
    assert svdkit.config("MiLoRA", rank=4) == svdkit.MiLoRA(rank=4)


def test_scaling_follows_peft():
    assert svdkit.LoRA(rank=16).scaling == 1.0
    assert svdkit.LoRA(rank=16, alpha=32).scaling == 2.0
    assert svdkit.LoRA(rank=16, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)


@pytest.mark.parametrize("options,match", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=-3), "rank must be a positive integer"),
    (dict(svd="lanczos"), "svd must be 'exact' or 'randomized'"),
    (dict(targets="q_proj("), "not a valid regular expression"),
    (dict(overrides={"q_proj": {"targets": "x"}}), "cannot vary per module"),
    (dict(dropout=1.0), "dropout"),
    (dict(compute_dtype="float16"), "compute_dtype"),
])  # fmt: skip
def test_config_rejects_bad_values(options, match):
    with pytest.raises(ValueError, match=match):
        svdkit.PiSSA(**options)


def test_unknown_method_suggests_the_nearest():
    with pytest.raises(ValueError, match="unknown method 'pisa'. Did you mean 'pissa'"):
        svdkit.config("pisa")
    with pytest.raises(TypeError, match="no option.*'rnak'"):
        svdkit.config("pissa", rnak=4)


def test_config_from_newer_version_is_refused():
    data = svdkit.PiSSA().to_dict() | {"_version": 99}
    with pytest.raises(ValueError, match="newer than this svdkit"):
        svdkit.config_from_dict(data)


# -- targets -----------------------------------------------------------------------------------------
def _suffixes(model, targets):
    return sorted({n.split(".", 3)[-1] for n, _ in select_targets(model, targets)})


def test_presets_on_three_architectures():
    llama, gpt2, bert = tiny_model("llama"), tiny_model("gpt2"), tiny_model("bert")
    assert _suffixes(llama, "attention") == ["self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]
    assert _suffixes(llama, "mlp") == ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"]
    assert len(select_targets(llama, "all-linear")) == 14  # lm_head excluded
    assert _suffixes(gpt2, "attention") == ["attn.c_attn", "attn.c_proj"]
    assert _suffixes(gpt2, "mlp") == ["mlp.c_fc", "mlp.c_proj"]
    assert not any("lm_head" in n for n, _ in select_targets(gpt2, "all-linear"))
    assert _suffixes(bert, "attention") == ["attention.output.dense", "attention.self.key",
                                            "attention.self.query", "attention.self.value"]  # fmt: skip
    assert _suffixes(bert, "mlp") == ["intermediate.dense", "output.dense"]
    assert [n for n, _ in select_targets(bert, r"layer\.1\..*query")] == ["encoder.layer.1.attention.self.query"]


def test_targets_matching_nothing_lists_the_modules():
    with pytest.raises(ValueError, match=r"matched no linear module.*15 linear modules.*q_proj"):
        svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2, targets="query"))


def test_exclude_and_overrides():
    model = tiny_model("llama")
    cfg = svdkit.PiSSA(rank=4, targets="attention", exclude=r"layers\.1\.", overrides={"k_proj|v_proj": {"rank": 2}})
    svdkit.adapt(model, cfg)
    ranks = {n: layer.rank for n, layer in adapted_layers(model)}
    assert ranks == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.k_proj": 2,
                     "model.layers.0.self_attn.v_proj": 2, "model.layers.0.self_attn.o_proj": 4}  # fmt: skip


# -- the defining equations --------------------------------------------------------------------------
@pytest.mark.parametrize("cls,sl", [(svdkit.PiSSA, slice(0, 4)), (svdkit.MiLoRA, slice(-4, None))])
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_residual_methods_adapt_their_slice_of_the_spectrum(cls, sl, alpha):
    model = tiny_model("llama")
    originals = {n: weight_matrix(m).detach().clone() for n, m in select_targets(model, "all-linear")}
    svdkit.adapt(model, cls(rank=4, alpha=alpha, dropout=0.0))
    for name, layer in adapted_layers(model):
        U, S, Vh = torch.linalg.svd(originals[name].double(), full_matrices=False)
        part = (U[:, sl] * S[sl]) @ Vh[sl]  # U_idx Σ_idx V_idxᵀ
        s = layer.scaling
        torch.testing.assert_close((s * layer.lora_B @ layer.lora_A).double(), part, atol=1e-5, rtol=0)
        # the √σ split: column norms of B equal row norms of A (both √(σ/s))
        torch.testing.assert_close(layer.lora_B.norm(dim=0), layer.lora_A.norm(dim=1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.norm(dim=0).double() ** 2, S[sl] / s, atol=1e-5, rtol=1e-4)


def test_lora_init_is_kaiming_uniform_and_zero_b():
    model = tiny_model("llama")
    svdkit.adapt(model, svdkit.LoRA(rank=4))
    for _, layer in adapted_layers(model):
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.init_A is None
        assert layer.lora_A.abs().max() <= 1 / math.sqrt(layer.in_features)
        assert layer.lora_A.std() > 0.4 / math.sqrt(layer.in_features)  # U(-b, b) has std b/√3 ≈ 0.577 b


def test_fold_replaces_the_weight_with_the_residual_and_never_writes_the_original():
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    original = q.weight
    snapshot = original.detach().clone()
    svdkit.adapt(model, svdkit.PiSSA(rank=4, fold=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight is not original and torch.equal(original, snapshot)
    torch.testing.assert_close(layer.weight + layer.scaling * layer.init_B @ layer.init_A, snapshot, atol=1e-6, rtol=0)


def test_regularization_is_zero_for_methods_without_one():
    model = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2))
    reg = svdkit.regularization(model)
    assert reg.shape == () and float(reg) == 0.0


def test_trained_adapter_gets_gradients_and_base_does_not(ids):
    model = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name


# -- bad input ---------------------------------------------------------------------------------------
def _untouched(model, reference):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.values())) and not hasattr(model, "_svdkit")


def test_rank_too_large_names_the_module_and_leaves_the_model_untouched():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank 16 is too large for model.layers.0.self_attn.k_proj \(weight 16×32\)"):
        svdkit.adapt(model, svdkit.PiSSA(rank=16))
    assert _untouched(model, before)


@pytest.mark.parametrize("poison,error,match", [
    (float("nan"), ValueError, "mlp.up_proj.*NaN/Inf"),
    (float("inf"), ValueError, "mlp.up_proj.*NaN/Inf"),
])  # fmt: skip
def test_non_finite_weights(poison, error, match):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = poison
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        svdkit.adapt(model, svdkit.PiSSA(rank=2))
    assert not any(".lora_" in k for k in model.state_dict()) and not hasattr(model, "_svdkit")
    assert before.keys() == model.state_dict().keys()


def test_integer_weights_are_refused():
    layer = torch.nn.Linear(8, 8)
    layer.weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="dtype torch.int8.*dequantize"):
        svdkit.adapt(torch.nn.Sequential(layer), svdkit.PiSSA(rank=2, targets="0"))


def test_adapting_twice_and_calibration_for_data_free_methods_are_refused():
    model = svdkit.adapt(tiny_model("llama"), svdkit.LoRA(rank=2))
    with pytest.raises(ValueError, match="already adapted"):
        svdkit.adapt(model, svdkit.LoRA(rank=2))
    with pytest.raises(ValueError, match="does not use calibration"):
        svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2), calibration={"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="not adapted"):
        svdkit.unadapt(tiny_model("llama"))


def test_half_precision_base_keeps_fp32_adapters(ids):
    model = tiny_model("llama").to(torch.bfloat16)
    with torch.no_grad():
        y0 = model_output(model, ids)
        svdkit.adapt(model, svdkit.PiSSA(rank=4))
        y1 = model_output(model, ids)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    assert torch.equal(y0, y1)  # the exact (subtracting) form is function-preserving even in bf16
