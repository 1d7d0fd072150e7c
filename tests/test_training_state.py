"""Methods' training-time state (AdaLoRA's EMAs, masks and phase; VectorFit's frozen vectors) lives in each
layer's ``method_state``, is saved by checkpoints, and makes an interrupted + resumed run equal the
uninterrupted one."""

from __future__ import annotations

import shutil

import pytest
import torch

import svdkit
from svdkit.adapters import api
from svdkit.adapters.zoo.singular_values import avf_frozen
from svdkit.training import finetune as ft
from svdkit.training.finetune import FinetuneConfig, Interrupted, finetune

from conftest import tiny_model

RUNS = {
    # pruning from step 2 to 5 of 8 (t_i = 1, t_f = 3): the EMAs of steps 1..3 decide the masks after the break
    "adalora": dict(method="adalora", rank=4, method_options={"target_r": 2, "tinit": 1, "tfinal": 3}),
    # AVF boundaries at steps 2, 4, 6: the set frozen at step 2 acts on the steps after the break
    "vectorfit": dict(method="vectorfit", method_options={"avf_interval": 2, "avf_fraction": 0.3}),
}


def _cfg(inputs, run: str) -> FinetuneConfig:
    model, data = inputs
    return FinetuneConfig(model=str(model), data=str(data), steps=8, batch_size=4, lr=2e-2, eval_every=100,
                          checkpoint_every=100, samples=0, max_heldout=4, **RUNS[run])  # fmt: skip


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter.safetensors"))


def _interrupt(cfg, out, monkeypatch, at: int) -> None:
    real = ft.train_step

    def step(net, ddp, mbs, loop, **kw):
        if loop.step == at:
            raise KeyboardInterrupt  # finetune saves a checkpoint at step ``at`` and raises Interrupted
        return real(net, ddp, mbs, loop, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(ft, "train_step", step)
        with pytest.raises(Interrupted, match=f"interrupted at step {at}/"):
            finetune(cfg, out, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("run,at", [("adalora", 3), ("vectorfit", 3)])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_run_inputs, tmp_path, monkeypatch, run, at):
    cfg = _cfg(tiny_run_inputs, run)
    finetune(cfg, tmp_path / "full", progress=False, log=lambda *_: None)
    full = _adapter(tmp_path / "full")
    _interrupt(cfg, tmp_path / "resumed", monkeypatch, at)
    shutil.copytree(tmp_path / "resumed", tmp_path / "lost")
    finetune(cfg, tmp_path / "resumed", resume=True, progress=False, log=lambda *_: None)
    resumed = _adapter(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)
    # the same resume without the method's state (as before it was checkpointed) diverges: the test
    # measures the state, not luck
    with monkeypatch.context() as patch:
        patch.setattr(api, "load_training_state", lambda model, tensors: None)
        finetune(cfg, tmp_path / "lost", resume=True, progress=False, log=lambda *_: None)
    lost = _adapter(tmp_path / "lost")
    assert any(not torch.allclose(lost[key], full[key], atol=1e-6, rtol=0) for key in full)


def test_training_state_round_trips_onto_a_fresh_model():
    from svdkit.training import loop as train

    model = svdkit.adapt(tiny_model("llama"), svdkit.AdaLoRA(rank=4, target_r=2, tinit=1, tfinal=1, targets="v_proj"))
    assert api.training_state(model) == {}  # nothing before the first step
    lp = train.make_optimizer(model, lr=1e-2, weight_decay=0.0, total=6, warmup=1)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        ids = torch.randint(0, 128, (4, 8), generator=g)
        mbs = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
        train.train_step(model, model, mbs, lp, max_grad_norm=1.0, peak_lr=1e-2, total=6)
    saved = api.training_state(model)
    layer = "model.layers.0.self_attn.v_proj"
    assert {k for k in saved if k.startswith(layer)} == {f"{layer}.{k}" for k in (
        "avg_P", "avg_lambda", "avg_Q", "unc_P", "unc_lambda", "unc_Q", "keep", "phase")}  # fmt: skip
    assert saved[f"{layer}.phase"].tolist() == [1, 0, 3, 6] and saved[f"{layer}.keep"].dtype == torch.bool
    fresh = svdkit.adapt(tiny_model("llama"), svdkit.AdaLoRA(rank=4, target_r=2, tinit=1, tfinal=1, targets="v_proj"))
    api.load_training_state(fresh, saved)
    assert api.training_state(fresh).keys() == saved.keys()
    assert all(torch.equal(api.training_state(fresh)[k], v) for k, v in saved.items())
    assert not any(k.startswith("model.layers") for k in fresh.state_dict() if "avg_" in k)  # not in the adapter
    with pytest.raises(ValueError, match="'model.layers.9.mlp.x.keep' names no adapted layer"):
        api.load_training_state(fresh, {"model.layers.9.mlp.x.keep": torch.ones(2)})


def test_vectorfit_frozen_set_is_a_tensor_per_layer():
    model = svdkit.adapt(tiny_model("llama"), svdkit.VectorFit(avf_interval=1, avf_fraction=0.5, targets="q_proj"))
    layers = dict(api.adapted_layers(model))
    with torch.no_grad():
        next(iter(layers.values())).core.value.add_(1.0)  # the strongest vector
    api.after_step(model, 1, 10)
    frozen = {name: avf_frozen(layer) for name, layer in layers.items()}
    assert frozen[next(iter(layers))] == frozenset({"core.value"}) and sum(map(len, frozen.values())) == 1
    saved = api.training_state(model)
    assert all(v.dtype == torch.bool for v in saved.values()) and len(saved) == len(layers)
