"""BiLoRA (issue 18) and the general two-split mechanism of svdkit's loop: P, Q move only on D₁ steps and λ only
on D₂ steps; the splits are disjoint and cover the training items; each step draws from its own split."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters import api
from svdkit.training import finetune as ft
from svdkit.training import loop as train
from svdkit.training.finetune import FinetuneConfig, finetune

from conftest import tiny_model

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def test_update_is_scaled_p_diag_lambda_q_zero_at_init_with_its_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 12)).eval()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    svdkit.adapt(model, svdkit.BiLoRA(rank=3, alpha=6.0))
    layer, x = model[0], torch.randn(5, 9, generator=GEN(1))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3 * (12 + 9 + 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ W.T + b)
        lam = torch.randn(3, generator=GEN(2))
        layer.core.value.copy_(lam)
        P, Q = layer.lora_B.detach(), layer.lora_A.detach()
        torch.testing.assert_close(model(x), x @ (W + 2.0 * P @ torch.diag(lam) @ Q).T + b)
        reg = svdkit.regularization(model)
        eye = torch.eye(3)
        expected = 0.1 * 0.5 * (torch.linalg.norm(P.T @ P - eye) + torch.linalg.norm(Q @ Q.T - eye))
        torch.testing.assert_close(reg, expected)


def test_schedule_alternates_inner_steps_of_d1_with_one_of_d2():
    model = svdkit.adapt(tiny_model("llama"), svdkit.BiLoRA(rank=2, inner_steps=2, targets="q_proj"))
    assert [train.split_step(model, t) for t in range(7)] == [(1, 0), (1, 1), (2, 0), (1, 2), (1, 3), (2, 1), (1, 4)]
    plain = svdkit.adapt(tiny_model("llama"), svdkit.LoRA(rank=2, targets="q_proj"))
    assert [train.split_step(plain, t) for t in range(3)] == [(1, 0), (1, 1), (1, 2)]
    items = [{"id": i} for i in range(20)]
    splits = train.data_splits(model, items, seed=0)
    assert len(splits[2]) == 4 and len(splits[1]) == 16  # split_fraction 0.2
    assert sorted(x["id"] for s in splits.values() for x in s) == list(range(20))
    assert train.data_splits(plain, items, seed=0) == {1: items}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{t}": p.detach().clone() for n, layer in api.adapted_layers(model) for t, p in layer.adapter_parameters()}


def test_lambda_moves_only_on_d2_steps_and_p_q_only_on_d1_steps():
    model = svdkit.adapt(tiny_model("llama"), svdkit.BiLoRA(rank=4, targets=("q_proj", "v_proj")))
    with torch.no_grad():  # λ ≠ 0, so the task loss reaches P and Q as well
        for _, layer in api.adapted_layers(model):
            layer.core.value.normal_(0, 0.5, generator=GEN(3))
    lp = train.make_optimizer(model, lr=1e-2, weight_decay=0.1, total=6, warmup=1)
    g = GEN(0)
    for step in range(6):
        split, _ = train.split_step(model, lp.step)
        before = _snapshot(model)
        ids = torch.randint(0, 128, (4, 10), generator=g)
        train.train_step(model, model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}], lp,
                         max_grad_norm=1.0, peak_lr=1e-2, total=6, split=split)  # fmt: skip
        after = _snapshot(model)
        for key in before:
            moved = not torch.equal(before[key], after[key])
            assert moved == ((split == 2) == key.endswith("core.value")), (step, split, key)


def test_finetune_draws_d1_and_d2_batches_from_disjoint_splits(tiny_run_inputs, tmp_path, monkeypatch):
    model_dir, data = tiny_run_inputs
    cfg = FinetuneConfig(model=str(model_dir), data=str(data), method="bilora", rank=2, steps=2, batch_size=4,
                         eval_every=100, checkpoint_every=100, samples=0, max_heldout=4,
                         method_options={"split_fraction": 0.25})  # fmt: skip
    seen: dict[int, set] = {1: set(), 2: set()}
    real = ft.train_step

    def record(net, ddp, mbs, loop, **kw):
        for mb in mbs:
            for row, mask in zip(mb["input_ids"], mb["attention_mask"]):
                seen[kw["split"]].add(tuple(row[mask.bool()].tolist()))
        return real(net, ddp, mbs, loop, **kw)

    monkeypatch.setattr(ft, "train_step", record)
    finetune(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    assert seen[1] and seen[2] and not seen[1] & seen[2]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["split"] for row in rows] == [1, 2]  # the metrics say which split each step's loss is on


def test_one_stream_trainers_refuse_two_split_methods():
    """SvdkitCallback.on_train_begin (the Hugging Face Trainer) calls this check."""
    model = svdkit.adapt(tiny_model("llama"), svdkit.BiLoRA(rank=2, targets="q_proj"))
    with pytest.raises(ValueError, match="BiLoRA trains on two splits of the data, which the Hugging Face Trainer"):
        train.check_one_stream(model, "the Hugging Face Trainer")
    train.check_one_stream(svdkit.adapt(tiny_model("llama"), svdkit.LoRA(rank=2, targets="q_proj")), "x")  # fine


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="split_fraction"):
        svdkit.BiLoRA(split_fraction=1.0)
    with pytest.raises(ValueError, match="inner_steps"):
        svdkit.BiLoRA(inner_steps=0)
