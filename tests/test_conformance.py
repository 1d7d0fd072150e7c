"""DESIGN.md §2: the seven invariants, checked for every registered method on tiny Llama, GPT-2 and BERT.

Rows live in tests/rows/ (one module per method family); a registered method without a row fails
test_every_method_has_a_row.
"""

from __future__ import annotations

import pytest
import torch

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.adapters.layers import SpectralLinear, weight_matrix
from svdkit.core.targets import select_targets

from conftest import ARCHS, adapt, calibration_for, model_output, perturb_adapters, tiny_model
from rows import all_rows

ROWS = all_rows()
CASES = [pytest.param(row, arch, id=f"{row.id or row.method}-{arch}") for row in ROWS for arch in row.archs or ARCHS]
TOL = 1e-5
ADAPTER_KEYS = ("lora_", "init_", ".core.")


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def test_every_method_has_a_row():
    assert set(svdkit.methods()) <= {row.method for row in ROWS}


@pytest.mark.parametrize("row,arch", CASES)
def test_1_base_weights_never_changed_silently(row, arch):
    model = tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {k: v for k, v in model.named_parameters()}
    adapt(model, row.config())
    for name, p in params_before.items():  # no original tensor was written into
        assert torch.equal(p, before[name]), name
    assert sum(1 for _ in adapted_layers(model)) > 0
    svdkit.unadapt(model)
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        if row.options.get("fold"):  # folded: restored as W_res + s·B₀A₀, equal up to rounding
            assert close(after[key], before[key], 1e-6), key
        else:
            assert torch.equal(after[key], before[key]), key
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("row,arch", CASES)
def test_2_init_is_the_prescribed_function(row, arch, ids):
    """The original function, or exactly the change the paper prescribes (KaSA's truncation, NLoRA, …)."""
    model, cfg = tiny_model(arch), row.config()
    stats = calibration_for(model, cfg)
    extra = () if stats is None else (stats,)  # data-aware rows see the statistics too
    with torch.no_grad():
        expected = y0 = model_output(model, ids)
        if row.init_weight is not None:
            reference = tiny_model(arch)
            for name, module in select_targets(reference, cfg.targets, cfg.exclude):
                W = weight_matrix(module)
                W.copy_(row.init_weight(W.detach().clone(), cfg.for_module(name), name, *extra))
            expected = model_output(reference, ids)
            assert not close(expected, y0)  # the prescribed change is a real change
        svdkit.adapt(model, cfg, calibration=stats)
        assert close(model_output(model, ids), expected)


@pytest.mark.parametrize("row,arch", CASES)
def test_3_only_adapter_parameters_train(row, arch):
    model = tiny_model(arch)
    cfg = row.config()
    weights = [(name, weight_matrix(m).detach().clone(), m.bias is not None)
               for name, m in select_targets(model, cfg.targets, cfg.exclude)]  # fmt: skip
    adapt(model, cfg)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or ".core." in n for n in trainable)
    adapted = model._svdkit.module_configs  # per-module configs as resolved (EVA's ranks; dropped layers)
    expected = sum(row.params(W, adapted[name], bias) for name, W, bias in weights if name in adapted)
    assert sum(p.numel() for p in trainable.values()) == expected


@pytest.mark.parametrize("row,arch", CASES)
def test_4_merged_equals_adapted(row, arch, ids):
    model = tiny_model(arch)
    adapt(model, row.config())
    perturb_adapters(model)
    with torch.no_grad():
        y_adapted = model_output(model, ids)
        svdkit.merge(model)
        y_merged = model_output(model, ids)
    assert not any(isinstance(m, SpectralLinear) for m in model.modules())
    assert type(model) is type(tiny_model(arch))
    assert close(y_merged, y_adapted)


@pytest.mark.parametrize("row,arch", CASES)
def test_5_exported_peft_adapter_reproduces_outputs(row, arch, ids, tmp_path):
    from peft import PeftModel

    model = tiny_model(arch)
    with torch.no_grad():
        y_base = model_output(model, ids)
    adapt(model, row.config())
    perturb_adapters(model)
    with torch.no_grad():
        y_adapted = model_output(model, ids)
    assert not close(y_adapted, y_base)  # the adapter does change the function
    if not model._svdkit.config.exports_lora:  # a full-rank update: refused, pointing to the merged export
        with pytest.raises(ValueError, match="merge"):
            svdkit.export_peft(model, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
        return
    svdkit.export_peft(model, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        y_peft = model_output(peft_model, ids)
    assert close(y_peft, y_adapted)


@pytest.mark.parametrize("row,arch", CASES)
def test_6_reproducible(row, arch):
    a, b = tiny_model(arch), tiny_model(arch)
    adapt(a, row.config())
    adapt(b, row.config())
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if any(key in k for key in ADAPTER_KEYS)]
    assert keys and all(torch.equal(sa[k], sb[k]) for k in keys)


@pytest.mark.parametrize("row,arch", CASES)
def test_7_round_trip(row, arch, ids, tmp_path):
    model = tiny_model(arch)
    adapt(model, row.config())
    perturb_adapters(model)
    with torch.no_grad():
        y = model_output(model, ids)
    svdkit.save_adapter(model, tmp_path / "adapter")
    fresh = svdkit.load_adapter(tiny_model(arch), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(model_output(fresh, ids), y)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    with pytest.raises(svdkit.FingerprintMismatch, match="different base model"):
        svdkit.load_adapter(tiny_model(arch, seed=1), tmp_path / "adapter")
