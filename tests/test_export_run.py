"""Truncated PEFT export of full-rank updates, and `svdkit export RUN_DIR --format peft|merged`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import adapt, model_output, perturb_adapters, tiny_model

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.training.finetune import FinetuneConfig


def _peft_output(path, arch, ids):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_model(arch), str(path)).eval()
    with torch.no_grad():
        return model_output(peft_model, ids)


def _direct_errors(model, rank):
    out = {}
    for name, layer in adapted_layers(model):
        S = torch.linalg.svdvals(layer.delta_weight().detach().double())
        out[name] = float((S[rank:] ** 2).sum().sqrt() / (S ** 2).sum().sqrt())
    return out


def test_full_rank_update_exports_a_truncated_lora_with_its_error(ids, tmp_path):
    model = adapt(tiny_model("llama"), svdkit.config("svft"))
    perturb_adapters(model)
    with pytest.raises(ValueError, match="rank=R"):
        svdkit.export_peft(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    svdkit.export_peft(model, tmp_path / "r2", rank=2)
    report = json.loads((tmp_path / "r2" / "truncation.json").read_text())
    direct = _direct_errors(model, 2)
    assert set(report["layers"]) == set(direct)
    for name, err in direct.items():
        assert report["layers"][name]["relative_error"] == pytest.approx(err, rel=1e-5, abs=1e-7)
        assert report["layers"][name]["rank"] == 2
    assert report["max_relative_error"] == pytest.approx(max(direct.values()), rel=1e-5)
    assert 0 < report["max_relative_error"] < 1  # an SVFT update of these layers is not rank 2
    # a rank at least the layers' size is exact: PEFT reproduces the adapted model
    with torch.no_grad():
        y = model_output(model, ids)
    svdkit.export_peft(model, tmp_path / "full", rank=64)
    assert json.loads((tmp_path / "full" / "truncation.json").read_text())["max_relative_error"] < 1e-6
    torch.testing.assert_close(_peft_output(tmp_path / "full", "llama", ids), y, atol=1e-4, rtol=1e-4)
    # and the truncated adapter is what PEFT loads: its logits differ from the exact ones
    assert not torch.allclose(_peft_output(tmp_path / "r2", "llama", ids), y, atol=1e-4)


def test_low_rank_update_truncates_from_its_factors(ids, tmp_path):
    model = adapt(tiny_model("gpt2"), svdkit.config("pissa", rank=3))  # GPT-2 Conv1D: transposed weights
    perturb_adapters(model)
    with torch.no_grad():
        y = model_output(model, ids)
    svdkit.export_peft(model, tmp_path / "r1", rank=1)
    report = json.loads((tmp_path / "r1" / "truncation.json").read_text())
    for name, err in _direct_errors(model, 1).items():
        assert report["layers"][name]["relative_error"] == pytest.approx(err, rel=1e-5, abs=1e-7)
        assert report["layers"][name]["update_rank"] == 6  # ΔW = s(BA − B₀A₀): rank 2r after training
    svdkit.export_peft(model, tmp_path / "r6", rank=6)
    torch.testing.assert_close(_peft_output(tmp_path / "r6", "gpt2", ids), y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_export_rank_must_be_a_positive_integer(bad, tmp_path):
    model = adapt(tiny_model("llama"), svdkit.config("svft"))
    with pytest.raises(ValueError, match="positive integer"):
        svdkit.export_peft(model, tmp_path / "x", rank=bad)


@pytest.fixture
def run_dir(tiny_run_inputs, tmp_path):
    """A finished run's folder (config.json + adapter/) on the tiny Llama, made without training."""
    model_dir, data = tiny_run_inputs
    cfg = FinetuneConfig(model=str(model_dir), data=str(data), method="svft", rank=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    model, _ = svdkit.load_model(str(model_dir))
    svdkit.adapt(model, svdkit.config("svft"))
    perturb_adapters(model)
    svdkit.save_adapter(model, run / "adapter")
    with torch.no_grad():
        y = model(input_ids=torch.tensor([[1, 5, 9, 200, 3000]])).logits
    return run, y


def test_export_run_merged_is_a_plain_hf_folder(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run, y = run_dir
    summary = svdkit.export_run(run, "merged", tmp_path / "merged")
    assert summary["method"] == "svft" and summary["truncation"] is None
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=torch.tensor([[1, 5, 9, 200, 3000]])).logits, y, atol=1e-4, rtol=0)


def test_cli_export_peft_with_rank_prints_the_truncation(run_dir, tmp_path, capsys):
    from svdkit.cli import main

    run, _ = run_dir
    assert main(["export", str(run), "--format", "peft", "--rank", "1", "--out", str(tmp_path / "peft")]) == 0
    printed = capsys.readouterr().out
    assert "truncated to rank 1" in printed and "truncation.json" in printed
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    # without a rank a full-rank method is refused (exit 2, one line, nothing written)
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "p2")]) == 2
    assert "rank=R" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_export_refuses_what_is_not_a_run_and_bad_options(tmp_path, run_dir):
    run, _ = run_dir
    with pytest.raises(FileNotFoundError, match="not a finished svdkit finetune run"):
        svdkit.export_run(tmp_path / "empty", "peft", tmp_path / "o")
    with pytest.raises(ValueError, match="format"):
        svdkit.export_run(run, "gguf", tmp_path / "o")
    with pytest.raises(ValueError, match="takes no rank"):
        svdkit.export_run(run, "merged", tmp_path / "o", rank=2)
    with pytest.raises(ValueError, match="inside the run folder"):
        svdkit.export_run(run, "merged", run / "merged")
