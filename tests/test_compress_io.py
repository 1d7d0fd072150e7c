"""Compressed models on disk: save → load round trip, refusals, no pickle, dense export, the CLI, and
fine-tuning a compressed folder (SVD-LLM's LoRA "parameter update" on the factors)."""

from __future__ import annotations

import json

import pytest
import torch

import svdkit
from svdkit.cli import main
from svdkit.compression import LowRankLinear
from tests.conftest import calibration_batches, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_load_reproduces_logits_exactly_and_pickles_nothing(arch, tmp_path):
    model = tiny_model(arch)
    cfg = svdkit.config("svd-llm", ratio=0.3)
    report = svdkit.compress(model, cfg, calibration=calibration_batches(), progress=False)
    out = svdkit.save_compressed(model, tmp_path / "small", config=cfg, report=report, dense=True)
    assert {p.suffix for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")} <= {".json", ".safetensors", ".md"}
    loaded = svdkit.load_compressed(out)
    ids = calibration_batches(1)[0]["input_ids"]
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())
    meta = json.loads((out / "svdkit.json").read_text())
    assert meta["config"]["_type"] == "svd-llm" and len(meta["modules"]) == len(report.rows)
    import transformers as tf  # the dense export loads with plain transformers

    dense = tf.AutoModelForCausalLM.from_pretrained(str(out / "dense"))
    assert torch.allclose(_logits(dense, ids), _logits(model, ids), atol=1e-4)


def test_loading_refuses_other_folders_and_saving_refuses_uncompressed_models(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not an svdkit compressed model"):
        svdkit.load_compressed(tmp_path / "plain")
    with pytest.raises(ValueError, match="no compressed"):
        svdkit.save_compressed(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    svdkit.compress(model, svdkit.config("svd", ratio=0.5))
    svdkit.save_compressed(model, tmp_path / "small")
    with pytest.raises(FileExistsError):
        svdkit.save_compressed(model, tmp_path / "small")


def test_load_model_accepts_a_compressed_folder_and_lora_targets_the_factors(tmp_path):
    model = tiny_model("llama")
    svdkit.compress(model, svdkit.config("svd", ratio=0.5))
    svdkit.save_compressed(model, tmp_path / "small")
    loaded, tok = svdkit.load_model(tmp_path / "small")
    assert tok is None and any(isinstance(m, LowRankLinear) for m in loaded.modules())
    svdkit.adapt(loaded, svdkit.config("pissa", rank=2))
    adapted = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert any(".q_proj.first." in n for n in adapted) and any(".q_proj.second." in n for n in adapted)


def test_cli_compresses_reports_and_the_folder_fine_tunes(tiny_run_inputs, tmp_path, capsys):
    from svdkit.training.finetune import FinetuneConfig, finetune

    model_dir, data = tiny_run_inputs
    out = tmp_path / "small"
    assert main(["compress", "--model", str(model_dir), "--method", "svd-llm", "--ratio", "0.3", "--calibration-data",
                 str(data), "--calibration-samples", "8", "--heldout", "8", "--out", str(out), "--dense"]) == 0  # fmt: skip
    text = (out / "report.md").read_text()
    for needle in ("perplexity (held-out)", "parameters", "weight bytes", "forward time", "| module |"):
        assert needle in text, needle
    assert "perplexity" in capsys.readouterr().out
    assert (out / "dense" / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert main(["compress", "--model", str(model_dir), "--method", "svd-llm", "--ratio", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    cfg = FinetuneConfig(model=str(out), data=str(data), method="pissa", rank=2, steps=2, batch_size=4, lr=1e-2,
                         eval_every=2, checkpoint_every=2, samples=1, max_heldout=4)  # fmt: skip
    summary = finetune(cfg, tmp_path / "heal", progress=False, log=lambda *_: None)
    assert summary["after"]["loss"] <= summary["before"]["loss"] + 1e-3


@pytest.mark.real_model
def test_default_model_first_block_compresses_and_round_trips(tmp_path):
    from svdkit.training import batches, data

    model, tok = svdkit.load_model("default")
    items = data.load_examples("lee", tok, max_length=64)
    train, held = data.split(items, 0.5, 0)
    pad = tok.eos_token_id
    base = batches.eval_loss(model, held[:4], 4, pad)[1]
    cfg = svdkit.config("svd-llm", ratio=0.2, targets=r"layers\.0\.")
    report = svdkit.compress(model, cfg, calibration=[batches.collate(train[i: i + 4], pad) for i in range(0, 16, 4)])
    assert len(report.rows) == 7 and report.removed == pytest.approx(0.2, abs=0.01)
    after = batches.eval_loss(model, held[:4], 4, pad)[1]
    assert after < 1.5 * base
    out = svdkit.save_compressed(model, tmp_path / "small", tokenizer=tok, config=cfg)
    loaded, tok2 = svdkit.load_model(out)
    ids = batches.collate(held[:2], pad)["input_ids"]
    assert tok2 is not None and torch.equal(_logits(loaded, ids), _logits(model, ids))
