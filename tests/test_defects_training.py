"""Regression tests for issue 11 (training): regularizers under the HF Trainer with gradient accumulation,
pickle-free checkpoints, `--resume --out DIR` alone, model folders with missing weights, calibrate keeping
the user's gradients, and errors that are not swallowed."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import svdkit
from svdkit.cli import main as cli_main

from conftest import VOCAB, calibration_batches, tiny_model

ROOT = Path(__file__).resolve().parents[1]


# -- item 4: regularizers once per optimizer step under the HF Trainer, as in svdkit's loop -------------------
@dataclass(frozen=True)
class StrongReg(svdkit.LoRA):
    """LoRA with a strong L2 regularizer on A (not registered), so a k× error is plain to see."""

    def regularizer(self, layer):
        return 5.0 * layer.lora_A.pow(2).sum()


def _one_trainer_step(tmp_path, per_device: int, accumulation: int) -> dict[str, torch.Tensor]:
    from transformers import TrainingArguments

    from svdkit.training.hf import SvdkitTrainer

    model = svdkit.adapt(tiny_model("llama"), StrongReg(rank=2, targets="v_proj"))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (4, 8), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path / f"ga{accumulation}"), max_steps=1, optim="sgd",
                             per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                             learning_rate=0.05, lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = SvdkitTrainer(model=model, args=args, train_dataset=rows)
    assert trainer.model_accepts_loss_kwargs  # the case where transformers does not divide by k
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_hf_trainer_with_accumulation_matches_one_big_batch(tmp_path):
    one, two = _one_trainer_step(tmp_path, 4, 1), _one_trainer_step(tmp_path, 2, 2)
    start = {n: p.detach() for n, p in svdkit.adapt(tiny_model("llama"), StrongReg(rank=2, targets="v_proj"))
             .named_parameters() if p.requires_grad}  # fmt: skip
    for name in one:
        if name.endswith("lora_A"):  # the step did something (the regularizer dominates A's update)
            assert (one[name] - start[name]).abs().max() > 1e-2, name
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5, msg=name)


# -- items 5, 12, 13: pickle-free checkpoints; `--resume --out DIR` alone; a torn metrics line ----------------
def _run_args(inputs, out, *extra):
    model, data = inputs
    return ["finetune", "--model", str(model), "--data", str(data), "--rank", "2", "--steps", "4", "--lr", "1e-2",
            "--batch-size", "4", "--eval-every", "100", "--checkpoint-every", "2", "--samples", "1",
            "--max-heldout", "4", "--method", "pissa", "--svd", "randomized", "--out", str(out), *extra]  # fmt: skip


def test_resume_with_only_the_run_folder_continues_the_run(tiny_run_inputs, tmp_path, monkeypatch, capsys):
    from svdkit.training import report

    out = tmp_path / "run"
    real = report.append_metrics

    class Killed(Exception):
        pass

    def killed_at_step_3(path, row):  # the run dies (SIGKILL: no handler runs) while writing step 3's row
        if row["step"] == 3:
            with open(path, "a") as f:
                f.write(json.dumps(row)[:9])
            raise Killed
        real(path, row)

    monkeypatch.setattr(report, "append_metrics", killed_at_step_3)
    with pytest.raises(Killed):
        cli_main(_run_args(tiny_run_inputs, out))
    monkeypatch.setattr(report, "append_metrics", real)
    state = out / "checkpoint"
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith(".")) == ["adapter", "state.json", "state.safetensors"]
    assert json.loads((state / "state.json").read_text())["state"]["step"] == 2  # JSON + tensors, no pickle
    assert cli_main(["finetune", "--resume", "--out", str(out), "--rank", "4"]) == 2  # typed and different
    assert "rank: checkpoint 2 vs now 4" in capsys.readouterr().err
    assert cli_main(["finetune", "--resume", "--out", str(out)]) == 0  # nothing repeated
    rows = report.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((out / "eval.json").read_text())["rank"] == 2


def test_a_pickled_checkpoint_of_an_older_svdkit_is_refused(tiny_run_inputs, tmp_path):
    from svdkit.training.finetune import FinetuneConfig, _prepare_out

    cfg = FinetuneConfig(model=str(tiny_run_inputs[0]), data=str(tiny_run_inputs[1]))
    _prepare_out(tmp_path / "run", cfg, resume=False, overwrite=False)
    (tmp_path / "run" / "checkpoint").mkdir()
    (tmp_path / "run" / "checkpoint" / "state.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="older svdkit .*pickled state.pt"):
        _prepare_out(tmp_path / "run", cfg, resume=True, overwrite=False)


def test_nothing_in_the_repository_unpickles():
    needle = "weights_only=" + "False"
    hits = [str(p.relative_to(ROOT)) for folder in ("svdkit", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")
            if needle in p.read_text()]  # fmt: skip
    assert not hits


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    import random

    from svdkit.core.checkpoint import load_state, save_state
    from svdkit.training.loop import make_optimizer, rng_state

    layer = torch.nn.Linear(3, 2)
    loop = make_optimizer(layer, 1e-2, 0.1, 10, 2)
    layer(torch.randn(4, 3)).sum().backward()
    loop.optimizer.step()
    loop.scheduler.step()
    state = {"step": 1, "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(), "rng": rng_state()}
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back["rng"]["python"] == random.getstate() and torch.equal(back["rng"]["torch"], torch.get_rng_state())
    assert back["scheduler"] == state["scheduler"] and back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for i, entry in state["optimizer"]["state"].items():
        assert all(torch.equal(back["optimizer"]["state"][i][k], v) for k, v in entry.items())
    with pytest.raises(TypeError, match="only tensors, numbers"):
        save_state(tmp_path, {"fn": print})


# -- item 11: a model folder with missing or unexpected weights is refused ----------------------------------
def _broken_folder(tmp_path, drop: str | None, extra: str | None) -> Path:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if drop is None or drop not in k}
    if extra:
        tensors[extra] = torch.zeros(3)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("drop,extra,match", [
    ("q_proj", None, r"2 missing \(model.layers.0.self_attn.q_proj.weight, model.layers.1.self_attn.q_proj.weight\)"),
    (None, "model.layers.0.mlp.renamed.weight", r"1 unexpected \(model.layers.0.mlp.renamed.weight\)"),
])  # fmt: skip
def test_load_model_refuses_a_folder_with_missing_or_unexpected_weights(tmp_path, drop, extra, match):
    folder = _broken_folder(tmp_path, drop, extra)
    with pytest.raises(ValueError, match=match):
        svdkit.load_model(folder)


def test_load_model_accepts_a_complete_folder(tmp_path):
    model, _ = svdkit.load_model(_broken_folder(tmp_path, None, None))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, tiny_model("llama").model.layers[0].self_attn.q_proj.weight)


# -- item 13: calibrate keeps the user's gradients; errors are not swallowed -------------------------------
def test_calibrate_leaves_the_users_gradients_alone():
    model = tiny_model("llama")
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    cfg = svdkit.config("lora-ga", rank=2, targets="q_proj")
    stats = svdkit.calibrate(model, calibration_batches(), cfg, progress=False)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    model.zero_grad(set_to_none=True)  # and the statistic did not include the user's gradients
    again = svdkit.calibrate(model, calibration_batches(), cfg, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    assert all(torch.equal(stats[name][k], again[name][k]) for k in stats[name])


def test_an_error_in_the_fast_loss_path_reaches_the_caller_and_keeps_the_path(monkeypatch):
    from svdkit.training import batches as data

    model = tiny_model("llama")
    batch = calibration_batches(1)[0]
    real = type(model).forward

    @functools.wraps(real)  # the same signature: the model still takes logits_to_keep
    def out_of_memory_once(self, *args, **kwargs):
        if "logits_to_keep" in kwargs:
            monkeypatch.setattr(type(model), "forward", real)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", out_of_memory_once)
    with pytest.raises(torch.OutOfMemoryError):
        data.labelled_logits(model, batch)
    assert model._svdkit_mask_logits is True  # not switched off for good
    logits, targets = data.labelled_logits(model, batch)
    assert logits.shape == (len(targets), VOCAB)


def test_a_bug_while_rebuilding_an_adapter_is_not_called_corruption(tmp_path, monkeypatch):
    from svdkit.adapters import saving

    model = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2, targets="q_proj"))
    svdkit.save_adapter(model, tmp_path / "a")

    def bug(*args, **kwargs):
        raise TypeError("an internal bug")

    with monkeypatch.context() as m:
        m.setattr(saving, "SpectralLinear", bug)
        with pytest.raises(TypeError, match="an internal bug"):
            svdkit.load_adapter(tiny_model("llama"), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "svdkit.json").read_text())
    del next(iter(meta["modules"].values()))["scaling"]
    (tmp_path / "a" / "svdkit.json").write_text(json.dumps(meta))
    with pytest.raises(saving.AdapterFormatError, match=r"lacks \['scaling'\]; the adapter is corrupt"):
        svdkit.load_adapter(tiny_model("llama"), tmp_path / "a")
