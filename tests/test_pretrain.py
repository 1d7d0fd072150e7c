"""`svdkit pretrain` end to end on real offline text (fortunes + lee: the fast sources), its resume, and
`svdkit finetune --method full --optimizer galore` on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from svdkit.cli import main
from svdkit.training import corpus
from svdkit.training.pretrain import PretrainConfig, pretrain


pytestmark = pytest.mark.usefixtures("one_thread")

needs_fortunes = pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir(),
                                    reason="Debian package fortunes not installed (apt-get install -y fortunes)")  # fmt: skip
SMALL = dict(size="test", steps=4, batch_size=4, seq_len=32, eval_every=2, sources=("fortunes", "lee"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus"))


@needs_fortunes
def test_corpus_split_is_by_document_and_the_tokenizer_covers_it(cache):
    text = corpus.build(Path(cache), ("fortunes", "lee"), chars_per_source=150_000, vocab_size=4096)
    info = text["info"]
    assert 0 < info["heldout_documents"] < info["documents"] and text["tokenizer"].get_vocab_size() == 4096
    assert int(text["train"].max()) < 4096 and len(text["heldout"]) > 1000
    docs = corpus.documents(("fortunes",), 50_000)
    assert all(corpus.heldout_doc(d, 0.05) == corpus.heldout_doc(d, 0.05) for d in docs)  # a pure function of the text
    sample = "A visit to a strange place will bring fresh work."
    assert text["tokenizer"].decode(text["tokenizer"].encode(sample).ids) == sample


@needs_fortunes
def test_pretrain_cli_galore_writes_the_run(cache, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--optimizer", "galore", "--size", "test", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
            "--eval-every", "2", "--cache", cache, "--projection", "dct", "--out", str(out)]  # fmt: skip
    cfg = PretrainConfig(cache=cache, **SMALL)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    assert main(args + ["--config", str(tmp_path / "cfg.json")]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["method_config"]["projection"] == "dct" and summary["method_config"]["rank"] == 16  # hidden / 4
    assert summary["optimizer_state_bytes"] > 0 and summary["heldout"]["perplexity"] < 4096
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "heldout_loss" in rows[1]
    assert (out / "loss.png").is_file() and (out / "checkpoint" / "model.safetensors").is_file()


@needs_fortunes
@pytest.mark.parametrize("optimizer", ["osd", "lora"])
def test_pretrain_resume_continues_bit_identically(cache, tmp_path, optimizer):
    from safetensors.torch import load_file

    cfg = PretrainConfig(optimizer=optimizer, cache=cache, checkpoint_every=2, **SMALL)
    pretrain(cfg, tmp_path / "a", progress=False, log=lambda *_: None)
    assert pretrain(cfg, tmp_path / "b", until=2, progress=False, log=lambda *_: None) is None
    pretrain(cfg, tmp_path / "b", resume=True, progress=False, log=lambda *_: None)
    a, b = (load_file(str(tmp_path / r / "checkpoint" / "model.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    assert losses[0] == losses[1]
    if optimizer == "lora":  # LoRA-style training: block matrices frozen at their random init, adapters trained
        assert json.loads((tmp_path / "a" / "eval.json").read_text())["trainable_parameters"] < 362816


def test_finetune_full_with_galore(tiny_run_inputs, tmp_path):
    model, data = tiny_run_inputs
    out = tmp_path / "ft"
    code = main(["finetune", "--model", str(model), "--data", str(data), "--method", "full", "--optimizer", "galore",
                 "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--samples", "1", "--max-heldout", "4",
                 "--eval-every", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optimizer"] == "galore"
    shutil.rmtree(out)


def test_finetune_refuses_a_parametrization_with_the_pretrain_command(tiny_run_inputs, tmp_path, capsys):
    model, data = tiny_run_inputs
    code = main(["finetune", "--model", str(model), "--data", str(data), "--method", "full", "--optimizer", "sst",
                 "--steps", "1", "--samples", "1", "--max-heldout", "4", "--out", str(tmp_path / "ft")])  # fmt: skip
    assert code == 2 and "svdkit pretrain --optimizer sst" in capsys.readouterr().err
