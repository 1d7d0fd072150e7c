"""The svdkit adapter format, the PEFT export format, and their bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch

import svdkit
from svdkit.adapters import saving

from conftest import perturb_adapters, tiny_model


@pytest.fixture
def saved(tmp_path):
    model = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=4, overrides={"k_proj": {"rank": 2}}))
    perturb_adapters(model)
    svdkit.save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_metadata_describes_the_adapter(saved):
    model, path = saved
    meta = json.loads((path / "svdkit.json").read_text())
    assert svdkit.config_from_dict(meta["config"]) == model._svdkit.config
    info = meta["modules"]["model.layers.0.self_attn.k_proj"]
    assert info["rank"] == 2 and info["shape"] == [16, 32] and info["subtract"] and len(info["fingerprint"].split(":")[0]) == 16
    assert len(meta["modules"]) == 14 and meta["svdkit_version"] == svdkit.__version__
    assert sorted(p.name for p in path.iterdir()) == [".svdkit-output", "adapter.safetensors", "svdkit.json"]


def test_missing_adapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="no svdkit adapter.*svdkit.json is missing"):
        svdkit.load_adapter(tiny_model("llama"), tmp_path / "nowhere")


def test_corrupt_json(saved):
    _, path = saved
    (path / "svdkit.json").write_text("{not json")
    with pytest.raises(svdkit.AdapterFormatError, match="not valid JSON"):
        svdkit.load_adapter(tiny_model("llama"), path)


def test_truncated_tensors(saved):
    _, path = saved
    data = (path / "adapter.safetensors").read_bytes()
    (path / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(svdkit.AdapterFormatError, match="cannot be read"):
        svdkit.load_adapter(tiny_model("llama"), path)


def test_missing_tensor_leaves_the_base_untouched(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    tensors = load_file(str(path / "adapter.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.init_B"]
    save_file(tensors, str(path / "adapter.safetensors"))
    base = tiny_model("llama")
    with pytest.raises(svdkit.AdapterFormatError, match=r"down_proj.init_B is missing"):
        svdkit.load_adapter(base, path)
    assert not hasattr(base, "_svdkit") and not any("lora" in k for k in base.state_dict())


def test_fingerprint_mismatch_names_the_modules(saved):
    _, path = saved
    other = tiny_model("llama")
    with torch.no_grad():
        other.model.layers[1].self_attn.o_proj.weight.mul_(1.01)
    with pytest.raises(svdkit.FingerprintMismatch, match=r"1 of 14 modules.*layers.1.self_attn.o_proj: weights differ"):
        svdkit.load_adapter(other, path)


def test_never_overwrites_unless_told(saved):
    model, path = saved
    before = (path / "adapter.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists.*overwrite=True"):
        svdkit.save_adapter(model, path)
    assert (path / "adapter.safetensors").read_bytes() == before
    perturb_adapters(model, seed=5)
    svdkit.save_adapter(model, path, overwrite=True)
    assert (path / "adapter.safetensors").read_bytes() != before


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    model = svdkit.adapt(tiny_model("llama"), svdkit.LoRA(rank=2))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    for write in (svdkit.save_adapter, svdkit.export_peft):
        with pytest.raises(OSError, match="disk full"):
            write(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_peft_export_format(tmp_path):
    model = svdkit.adapt(tiny_model("gpt2"), svdkit.PiSSA(rank=4, alpha=8, targets="attention"))
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"]
    assert config["target_modules"] == sorted(f"transformer.h.{i}.attn.{m}" for i in (0, 1) for m in ("c_attn", "c_proj"))
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8, 32)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 8)


def test_read_adapter_rejects_foreign_json(tmp_path):
    (tmp_path / "svdkit.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    with pytest.raises(svdkit.AdapterFormatError, match="not written by svdkit"):
        saving.read_adapter(tmp_path)
