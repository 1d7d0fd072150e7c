"""`svdkit finetune` end to end on a tiny model with the real SmolLM2 tokenizer: outputs, resume after
SIGKILL, Ctrl-C, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import svdkit
from svdkit.core.checkpoint import load_state
from svdkit.training.finetune import FinetuneConfig, finetune


def _cfg(inputs, **kw):
    model, data = inputs
    base = dict(model=str(model), data=str(data), method="pissa", rank=2, steps=6, batch_size=4, lr=1e-2,
                eval_every=3, checkpoint_every=2, samples=2, max_heldout=8, method_options={"svd": "randomized"})  # fmt: skip
    return FinetuneConfig(**{**base, **kw})


def test_a_run_leaves_everything_behind(tiny_run_inputs, tmp_path):
    cfg = _cfg(tiny_run_inputs, merge=True)
    summary = finetune(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    out = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "loss.png", "eval.json", "samples.md", "adapter/svdkit.json",
                 "peft/adapter_config.json", "merged/config.json", "checkpoint/state.json"):  # fmt: skip
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "heldout_loss" in r] == [3, 6]
    assert summary["after"]["loss"] < summary["before"]["loss"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "**Before:**" in (out / "samples.md").read_text()
    assert FinetuneConfig.from_file(out / "config.json") == cfg  # re-runnable with --config
    # the merged folder is a plain HF model that reproduces the adapter
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"))
    adapted, _ = svdkit.load_model(cfg.model)
    svdkit.load_adapter(adapted, out / "adapter")
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=0)


def _cli(inputs, out, *extra):
    model, data = inputs
    return [sys.executable, "-m", "svdkit", "finetune", "--model", str(model), "--data", str(data), "--rank", "2",
            "--steps", "40", "--batch-size", "4", "--lr", "1e-2", "--eval-every", "100", "--checkpoint-every", "3",
            "--method", "milora", "--svd", "randomized", "--out", str(out), *extra]  # fmt: skip


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter.safetensors"))


def _wait_for_checkpoint(proc, out):
    deadline = time.time() + 120
    while not (out / "checkpoint" / "state.json").is_file():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.01)


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tiny_run_inputs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(tiny_run_inputs, tmp_path / "full"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli(tiny_run_inputs, tmp_path / "killed"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for_checkpoint(proc, tmp_path / "killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_state(tmp_path / "killed" / "checkpoint")["step"]
    assert step < 40 and not (tmp_path / "killed" / "eval.json").exists()  # really killed mid-way
    subprocess.run(_cli(tiny_run_inputs, tmp_path / "killed", "--resume"), check=True, env=env, capture_output=True)
    full, resumed = _tensors(tmp_path / "full"), _tensors(tmp_path / "killed")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    # far more steps than it can run before the signal lands (a loaded parent may poll late): never a race; and
    # SIGINT restored to its default in the child (a test run started in the background inherits it ignored,
    # and Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen(_cli(tiny_run_inputs, out, "--steps", "100000"), env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "checkpoint was saved" in output and "--resume" in output


def test_bad_runs_are_refused(tiny_run_inputs, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        out.mkdir()
        finetune(_cfg(tiny_run_inputs), out, resume=True, progress=False)
    finetune(_cfg(tiny_run_inputs, steps=2), tmp_path / "done", progress=False, log=lambda *_: None)
    with pytest.raises(FileExistsError, match="--overwrite.*--resume"):
        finetune(_cfg(tiny_run_inputs, steps=2), tmp_path / "done", progress=False)
    with pytest.raises(ValueError, match=r"different config \(steps: checkpoint 2 vs now 3"):
        finetune(_cfg(tiny_run_inputs, steps=3), tmp_path / "done", resume=True, progress=False)
    with pytest.raises(ValueError, match="unknown method 'pisa'"):
        _cfg(tiny_run_inputs, method="pisa")


def test_micro_batches_split_the_rank_share_and_mask_an_empty_one():
    from svdkit.training.finetune import _micro_batches

    items = [{"input_ids": [1, 2, 3 + i], "labels": [1, 2, 3 + i]} for i in range(3)]
    cfg = FinetuneConfig(batch_size=4, grad_accum=2)
    r0 = _micro_batches(cfg, items, rank=0, world=2, pad_id=0)  # share of 2, accumulated in 2 steps
    assert [mb["input_ids"][:, 2].tolist() for mb in r0] == [[3], [4]]
    r1 = _micro_batches(cfg, items, rank=1, world=2, pad_id=0)
    assert [mb["input_ids"][:, 2].tolist() for mb in r1] == [[5]]
    (empty,) = _micro_batches(cfg, items[:1], rank=1, world=2, pad_id=0)  # a 1-example last batch
    assert empty["input_ids"].tolist() == [[1, 2, 3]] and (empty["labels"] == -100).all()


def test_a_full_rank_method_ships_merged_weights_instead_of_a_peft_adapter(tiny_run_inputs, tmp_path):
    lines = []
    cfg = _cfg(tiny_run_inputs, method="clip-svd", method_options={}, steps=2, eval_every=2, merge=True)
    finetune(cfg, tmp_path / "run", progress=False, log=lines.append)
    assert (tmp_path / "run" / "adapter" / "svdkit.json").is_file() and (tmp_path / "run" / "merged").is_dir()
    assert not (tmp_path / "run" / "peft").exists()
    assert "no PEFT LoRA export" in lines[-1] and "merged" in lines[-1]
