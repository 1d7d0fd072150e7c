"""Parity with Hugging Face PEFT, the library users already have (tiny Llama, fp32)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import svdkit
from svdkit.adapters.api import adapted_layers

from conftest import perturb_adapters, tiny_model

TOL = 1e-4


def _peft_factors(peft_model, name):
    layer = peft_model.get_submodule(f"base_model.model.{name}")
    return layer, layer.lora_B["default"].weight, layer.lora_A["default"].weight, layer.scaling["default"]


@pytest.mark.parametrize("alpha", [4, 8])
def test_pissa_exact_is_peft_pissa(alpha, ids):
    base = tiny_model("llama")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=alpha, target_modules="all-linear",
                                                             init_lora_weights="pissa", lora_dropout=0.0))  # fmt: skip
    ours = svdkit.adapt(copy.deepcopy(base), svdkit.PiSSA(rank=4, alpha=alpha))
    layers = dict(adapted_layers(ours))
    assert len(layers) == 14
    for name, layer in layers.items():
        peft_layer, B, A, s = _peft_factors(theirs, name)
        assert s == layer.scaling
        # the same adapter subspace and factors, up to the sign of each singular pair
        signs = torch.sign((layer.lora_B * B).sum(0))
        torch.testing.assert_close(layer.lora_B, B * signs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_A, A * signs[:, None], atol=1e-5, rtol=1e-4)
        # PEFT writes W_res into the base; svdkit keeps W and subtracts s·B₀A₀: the same residual
        torch.testing.assert_close(peft_layer.base_layer.weight, layer.weight - s * layer.init_B @ layer.init_A,
                                   atol=1e-5, rtol=0)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=TOL, rtol=0)


def _train(model, params, ids, steps=5, lr=1e-2):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_pissa_trains_like_peft_pissa(ids):
    """Same init (up to sign) and same AdamW steps give the same function after training."""
    base = tiny_model("llama")
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules="all-linear",
                                                             init_lora_weights="pissa", lora_dropout=0.0))  # fmt: skip
    ours = svdkit.adapt(copy.deepcopy(base), svdkit.PiSSA(rank=4))
    l_theirs = _train(theirs, [p for p in theirs.parameters() if p.requires_grad], ids)
    l_ours = _train(ours, [p for p in ours.parameters() if p.requires_grad], ids)
    assert l_ours[-1] < l_ours[0] - 0.05
    assert l_ours == pytest.approx(l_theirs, abs=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("method,export_rank", [("lora", 4), ("pissa", 8), ("milora", 8)])
@pytest.mark.parametrize("trained", [False, True])
def test_exported_adapter_loads_in_peft_on_the_original_base(method, export_rank, trained, ids, tmp_path):
    model = svdkit.adapt(tiny_model("llama"), svdkit.config(method, rank=4, alpha=8, dropout=0.0))
    if trained:
        losses = _train(model, [p for p in model.parameters() if p.requires_grad], ids)
        assert losses[-1] < losses[0]
    with torch.no_grad():
        y = model(input_ids=ids).logits
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (export_rank, 2 * export_rank)  # α'/r' = s = 2
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, y, atol=TOL, rtol=0)
    # and PEFT's own merge of it gives the same plain model
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, y, atol=TOL, rtol=0)


def test_export_with_per_module_ranks_uses_rank_pattern(ids, tmp_path):
    cfg = svdkit.PiSSA(rank=4, overrides={r"k_proj|v_proj": {"rank": 2}, r"layers\.1\.mlp": {"alpha": 2.0}})
    model = svdkit.adapt(tiny_model("llama"), cfg)
    perturb_adapters(model)
    with torch.no_grad():
        y = model(input_ids=ids).logits
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["rank_pattern"].values()) == {4}
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, y, atol=TOL, rtol=0)
