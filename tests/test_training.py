"""The training loop's pieces: hooks, regularizers, gradient accumulation, the Trainer integration."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

import svdkit
from svdkit.training import batches, loop as train

from conftest import VOCAB, tiny_model

CALLS: list = []


@dataclass(frozen=True)
class Probe(svdkit.LoRA):
    """LoRA plus a regularizer and both hooks, recording their calls (not registered)."""

    def regularizer(self, layer):
        CALLS.append("reg")
        return 1e-3 * layer.lora_A.pow(2).sum()

    def after_clipping(self, layers, peak_lr):
        CALLS.append(("clip", len(layers), peak_lr, max(float(l.lora_A.grad.norm()) for l in layers.values())))

    def after_step(self, layers, step, total_steps):
        CALLS.append(("step", step, total_steps))


def _items(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (6 + i % 4,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


def test_cosine_schedule_with_warmup():
    f = train.cosine_with_warmup(total=10, warmup=2)
    assert [round(f(s), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_train_step_runs_regularizer_and_hooks_once_per_step():
    CALLS.clear()
    model = svdkit.adapt(tiny_model("llama"), Probe(rank=2, targets="q_proj"))
    loop = train.make_optimizer(model, lr=1e-2, weight_decay=0.0, total=3, warmup=1)
    for step in range(3):
        mbs = [batches.collate(batches.batch_at(_items(), step, 4, 0), 0)]
        row = train.train_step(model, model, mbs, loop, max_grad_norm=1e-3, peak_lr=1e-2, total=3)
        assert row["step"] == step + 1 and row["grad_norm"] > 0
    clips = [c for c in CALLS if c[0] == "clip"]
    assert [c for c in CALLS if c[0] == "step"] == [("step", 1, 3), ("step", 2, 3), ("step", 3, 3)]
    assert len(clips) == 3 and all(c[1] == 2 and c[2] == 1e-2 for c in clips)
    assert all(c[3] <= 1e-3 + 1e-9 for c in clips)  # the hook sees clipped gradients
    assert CALLS.count("reg") == 3 * 2  # once per step, per adapted layer


def test_gradient_accumulation_equals_one_big_batch():
    base = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2))
    models = [base, copy.deepcopy(base)]
    batch = _items(8)
    results = []
    for model, per in zip(models, (8, 2)):
        loop = train.make_optimizer(model, lr=1e-2, weight_decay=0.0, total=1, warmup=1)
        mbs = [batches.collate(batch[i : i + per], 0) for i in range(0, 8, per)]
        results.append(train.train_step(model, model, mbs, loop, max_grad_norm=10.0, peak_lr=1e-2, total=1))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-5)
    assert results[0]["grad_norm"] == pytest.approx(results[1]["grad_norm"], rel=1e-4)
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_hf_trainer_applies_regularizer_and_hooks(tmp_path):
    from transformers import TrainingArguments

    from svdkit.training.hf import SvdkitTrainer

    CALLS.clear()
    model = svdkit.adapt(tiny_model("llama"), Probe(rank=2, targets="v_proj"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = [{"input_ids": torch.tensor(i["input_ids"][:6]), "labels": torch.tensor(i["input_ids"][:6])} for i in _items(6)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)  # fmt: skip
    SvdkitTrainer(model=model, args=args, train_dataset=rows).train()
    assert [c for c in CALLS if c[0] == "step"] == [("step", 1, 3), ("step", 2, 3), ("step", 3, 3)]
    assert sum(1 for c in CALLS if c[0] == "clip") == 3 and CALLS.count("reg") == 3 * 2
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_hf_trainer_applies_output_regularizer(tmp_path, monkeypatch):
    """BA-LoRA under transformers.Trainer: one frozen-model forward per step, on the labelled positions only."""
    from transformers import TrainingArguments

    from svdkit.adapters import api
    from svdkit.training.hf import SvdkitTrainer

    seen = []
    real = api.output_regularization
    monkeypatch.setattr(api, "output_regularization", lambda m, b, out, *a: seen.append((out.shape, b)) or real(m, b, out, *a))
    model = svdkit.adapt(tiny_model("llama"), svdkit.BALoRA(rank=2, targets="v_proj", lambda_consistency=1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = [{"input_ids": torch.tensor(i["input_ids"][:6]), "labels": torch.tensor(i["labels"][:6])} for i in _items(6)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)  # fmt: skip
    SvdkitTrainer(model=model, args=args, train_dataset=rows).train()
    assert len(seen) == 2
    assert all(shape == (2 * 4, 128) for shape, _ in seen)  # 2 rows × 4 labelled tokens (positions 2..5)
    assert all(set(b) == {"input_ids", "labels"} for _, b in seen)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_train_step_output_regularizer_sees_each_micro_batch(monkeypatch):
    """The output regularizer runs once per micro-batch on that micro-batch's labelled logits, weighted 1/k."""
    from svdkit.adapters import api

    seen = []
    monkeypatch.setattr(api, "output_regularization", lambda m, b, out: seen.append(out.shape[0]) or out.sum() * 0 + 1.0)
    model = svdkit.adapt(tiny_model("llama"), svdkit.BALoRA(rank=2, targets="q_proj"))
    loop = train.make_optimizer(model, lr=1e-2, weight_decay=0.0, total=1, warmup=1)
    batch = _items(8)
    mbs = [batches.collate(batch[i : i + 2], 0) for i in range(0, 8, 2)]
    train.train_step(model, model, mbs, loop, max_grad_norm=10.0, peak_lr=1e-2, total=1)
    assert seen == [int((mb["labels"][:, 1:] != -100).sum()) for mb in mbs]


def test_soma_anneals_weight_decay_by_cosine_in_the_loop():
    import math

    model = svdkit.adapt(tiny_model("llama"), svdkit.SoMA(rank=2, targets="q_proj"))
    loop = train.make_optimizer(model, lr=1e-2, weight_decay=0.05, total=4, warmup=1)
    seen = []
    loop.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["weight_decay"]))
    for step in range(4):
        mbs = [batches.collate(batches.batch_at(_items(), step, 4, 0), 0)]
        train.train_step(model, model, mbs, loop, max_grad_norm=1.0, peak_lr=1e-2, total=4)
    expected = [1e-5 + (0.05 - 1e-5) * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)]
    assert seen == pytest.approx(expected, rel=1e-12) and seen[0] == pytest.approx(0.05)
    assert loop.optimizer.state_dict()["param_groups"][0]["initial_weight_decay"] == 0.05  # saved for resume
    assert svdkit.PiSSA().weight_decay_at(0.1, 3, 4) == 0.1  # other methods: constant
    with pytest.raises(ValueError, match="final_weight_decay"):
        svdkit.SoMA(final_weight_decay=-1.0)


def test_adalora_budget_schedule_runs_under_the_hf_trainer(tmp_path):
    """PEFT's AdaLoRA needs a hand-written update_and_allocate call; under SvdkitTrainer it just runs."""
    from transformers import TrainingArguments

    from svdkit.training.hf import SvdkitTrainer
    from svdkit.adapters.zoo.adalora import ranks

    model = svdkit.adapt(tiny_model("llama"), svdkit.AdaLoRA(rank=4, target_r=2, tinit=1, tfinal=1, targets="v_proj"))
    rows = [{"input_ids": torch.tensor(i["input_ids"][:6]), "labels": torch.tensor(i["input_ids"][:6])} for i in _items(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
    SvdkitTrainer(model=model, args=args, train_dataset=rows).train()
    assert sum(ranks(model).values()) == 2 * 2  # pruned from 2 layers × 4 to the target budget 2 layers × 2
