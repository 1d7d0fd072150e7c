"""Lingo (issue 18): AdaLoRA's triplets and budget, plus stochastic re-introduction of pruned directions — the
draw against its stated distribution, the gain EMA against its formula, re-introduction happening in training
(where AdaLoRA never brings a direction back), the export at rank nnz(λ), and resume-exactness of its state."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters import api
from svdkit.adapters.rank_schedule import LayerState
from svdkit.adapters.zoo.lingo import GAIN, flip_sides, reintroduce
from svdkit.training import finetune as ft
from svdkit.training import loop as train
from svdkit.training.finetune import FinetuneConfig, Interrupted, finetune

from conftest import tiny_model

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731


def test_update_is_scaled_p_diag_lambda_q_and_zero_at_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 12)).eval()
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    svdkit.adapt(model, svdkit.Lingo(rank=4, target_r=2, alpha=6.0))
    layer, x = model[0], torch.randn(5, 9, generator=GEN(1))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (12 + 9 + 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ W.T + b)
        lam = torch.randn(4, generator=GEN(2))
        layer.core.value.copy_(lam)
        P, Q = layer.lora_B.detach(), layer.lora_A.detach()
        torch.testing.assert_close(model(x), x @ (W + 1.5 * P @ torch.diag(lam) @ Q).T + b)


def test_reintroduction_keeps_the_top_scores_and_draws_only_pruned_directions():
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1, 0.0])
    pruned = torch.tensor([False, False, False, False, False, True, True, True])
    gain = torch.tensor([0.0, 0, 0, 0, 0, 1.0, 1.0, 1.0])
    for seed in range(20):
        keep = reintroduce(scores, pruned, gain, keep_count=4, slots=1, gen=GEN(seed))
        assert int(keep.sum()) == 4 and keep[:3].all() and not keep[3:5].any()  # top 3 by score, 1 drawn
        assert int(keep[5:].sum()) == 1
    no_slots = reintroduce(scores, pruned, gain, keep_count=4, slots=0, gen=GEN(0))
    assert no_slots.tolist() == [True] * 4 + [False] * 4  # AdaLoRA's rule
    too_few = reintroduce(scores, torch.zeros(8, dtype=torch.bool), gain, keep_count=4, slots=2, gen=GEN(0))
    assert too_few.tolist() == [True] * 4 + [False] * 4  # no pruned candidate: the slots go by score


def test_reintroduction_draw_follows_gain_plus_mean_gain():
    scores = torch.zeros(5)
    pruned = torch.ones(5, dtype=torch.bool)
    gain = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    expected = (gain + gain.mean()) / (gain + gain.mean()).sum()  # [2, 3, 4, 5, 6] / 20
    draws = torch.stack([reintroduce(scores, pruned, gain, keep_count=1, slots=1, gen=GEN(s)) for s in range(3000)])
    freq = draws.double().mean(0)
    assert torch.allclose(freq, expected.double(), atol=0.03), freq
    uniform = torch.stack([reintroduce(scores, pruned, torch.zeros(5), 1, 1, GEN(s)) for s in range(1000)]).double().mean(0)
    assert torch.allclose(uniform, torch.full((5,), 0.2, dtype=torch.float64), atol=0.05)  # all gains 0: uniform


def _run(method: str, steps: int = 10, **options):
    model = svdkit.adapt(tiny_model("llama"), svdkit.config(method, rank=4, target_r=1, targets="v_proj", **options))
    lp = train.make_optimizer(model, lr=5e-2, weight_decay=0.0, total=steps, warmup=1)
    g, history = GEN(0), []
    layers = dict(api.adapted_layers(model))
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 8), generator=g)
        train.train_step(model, model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}], lp,
                         max_grad_norm=1.0, peak_lr=5e-2, total=steps)  # fmt: skip
        keeps = [LayerState(layer).keep for layer in layers.values()]
        if keeps[0] is not None:  # from the first allocation on
            history.append(torch.cat([k.clone() for k in keeps]))
    return model, history


def _reintroduced(history) -> int:
    """How often a direction pruned at one allocation is kept at a later one."""
    return sum(int((~a & b).sum()) for a, b in zip(history, history[1:]))


def test_pruned_directions_come_back_in_lingo_more_than_in_adalora():
    """AdaLoRA can only bring a direction back by chance (a pruned triplet keeps the score its P, Q earned);
    Lingo gives ⌊0.5·b⌋ slots to pruned directions at every allocation before the final one."""
    _, lingo = _run("lingo", deltaT=2, reintroduce=0.5, tfinal=2, sampling="gain")
    _, adalora = _run("adalora", deltaT=2, tfinal=2)
    assert _reintroduced(lingo) >= 2 and _reintroduced(lingo) > _reintroduced(adalora)
    assert int(lingo[-1].sum()) == 2  # the final allocation meets the budget b_T = target_r × layers


def test_code_sampling_flips_each_side_of_the_threshold_with_probability_p():
    keep = torch.tensor([True] * 50 + [False] * 50)
    flips = torch.stack([flip_sides(keep, 0.1, GEN(s)) != keep for s in range(400)]).double()
    assert abs(float(flips[:, :50].mean()) - 0.1) < 0.01 and abs(float(flips[:, 50:].mean()) - 0.1) < 0.01
    assert abs(float(flips.mean(0).std())) < 0.05  # every entry alike, independently


def test_code_sampling_zeroes_every_lambda_below_the_threshold_and_flips_sides(monkeypatch):
    from svdkit.adapters.zoo import lingo as lingo_mod
    from svdkit.core.linalg import layer_seed

    cfg = svdkit.Lingo(rank=4, target_r=1, targets="v_proj", reintroduce=0.5, seed=3)
    model = svdkit.adapt(tiny_model("llama"), cfg)
    layers = [layer for _, layer in api.adapted_layers(model)]
    lam = [torch.arange(1.0, 5.0) + 10 * i for i in range(len(layers))]
    with torch.no_grad():
        for layer, v in zip(layers, lam):
            layer.core.value.copy_(v)
    scores = {id(layer): v.clone() for layer, v in zip(layers, lam)}  # score ∝ λ: the threshold is known
    monkeypatch.setattr(lingo_mod, "triplet_scores", lambda layer: scores[id(layer)])
    flat = torch.cat(lam)
    n_pruned = len(flat) - 3
    by_score = flat > torch.kthvalue(flat, n_pruned).values
    cfg._allocate(layers, n_pruned, step=4, final=False)
    keep = torch.cat([LayerState(layer).keep.cpu() for layer in layers])
    values = torch.cat([layer.core.value.detach().cpu() for layer in layers])
    expected = flip_sides(by_score, 0.5, torch.Generator().manual_seed(layer_seed(3, "lingo-step-4")))
    assert torch.equal(keep, expected) and not torch.equal(keep, by_score)  # seeded by (seed, step); p = 0.5 flips
    assert (values[~by_score] == 0).all() and torch.equal(values[by_score], flat[by_score])  # below: λ reset to 0


def test_gain_is_the_ema_of_the_lambda_gradient_magnitude():
    model = svdkit.adapt(tiny_model("llama"), svdkit.Lingo(rank=4, target_r=2, targets="v_proj", beta1=0.5))
    layer = next(layer for _, layer in api.adapted_layers(model))
    layers = dict(api.adapted_layers(model))
    g1, g2 = torch.randn(4, generator=GEN(1)), torch.randn(4, generator=GEN(2))
    for g in (g1, g2):
        for each in layers.values():
            each.core.value.grad = g.clone()
        svdkit.config("lingo", beta1=0.5).after_clipping(layers, 1e-3)
    torch.testing.assert_close(layer.method_state.get(GAIN), 0.5 * (0.5 * g1.abs()) + 0.5 * g2.abs())


def test_export_leaves_pruned_directions_out(tmp_path):
    import json

    model, history = _run("lingo", steps=6, deltaT=1, reintroduce=0.3, sampling="gain")
    svdkit.export_peft(model, tmp_path / "peft")
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text()).get("rank_pattern", {})
    ranks = {name: int(torch.count_nonzero(layer.core.value)) for name, layer in api.adapted_layers(model)}
    assert sum(ranks.values()) == int(history[-1].sum())
    for name, r in ranks.items():
        assert pattern.get(name, pattern.get(name.split(".", 1)[-1], r)) == r or any(v == r for v in pattern.values())


# -- resume-exactness of the method's state (gains, EMAs, masks, phase) --------------------------------------
def _cfg(inputs) -> FinetuneConfig:
    model, data = inputs
    return FinetuneConfig(model=str(model), data=str(data), steps=6, batch_size=4, lr=2e-2, eval_every=100,
                          checkpoint_every=100, samples=0, max_heldout=4, method="lingo", rank=4,
                          method_options={"target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 2, "reintroduce": 0.5})  # fmt: skip


def _adapter(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter.safetensors"))


def test_interrupted_and_resumed_equals_uninterrupted(tiny_run_inputs, tmp_path, monkeypatch):
    cfg = _cfg(tiny_run_inputs)
    finetune(cfg, tmp_path / "full", progress=False, log=lambda *_: None)
    real = ft.train_step

    def step(net, ddp, mbs, loop, **kw):
        if loop.step == 3:
            raise KeyboardInterrupt
        return real(net, ddp, mbs, loop, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(ft, "train_step", step)
        with pytest.raises(Interrupted):
            finetune(cfg, tmp_path / "resumed", progress=False, log=lambda *_: None)
    shutil.copytree(tmp_path / "resumed", tmp_path / "lost")
    finetune(cfg, tmp_path / "resumed", resume=True, progress=False, log=lambda *_: None)
    full, resumed = _adapter(tmp_path / "full"), _adapter(tmp_path / "resumed")
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0, msg=key)
    with monkeypatch.context() as patch:  # without the method's state the run diverges: the test measures it
        patch.setattr(api, "load_training_state", lambda model, tensors: None)
        finetune(cfg, tmp_path / "lost", resume=True, progress=False, log=lambda *_: None)
    lost = _adapter(tmp_path / "lost")
    assert any(not torch.allclose(lost[key], full[key], atol=1e-6, rtol=0) for key in full)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="reintroduce"):
        svdkit.Lingo(reintroduce=1.0)
    with pytest.raises(ValueError, match="target_r"):
        svdkit.Lingo(rank=4, target_r=5)
