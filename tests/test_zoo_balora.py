"""BA-LoRA (METHODS.md §19, https://arxiv.org/abs/2408.04556): PiSSA's init plus three output-space regularizers,
each checked against its formula written out here (float64, loops where that is clearer), and the machinery
they need: svdkit.adapters_disabled, svdkit.output_regularization, svdkit's train_step.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters import api
from svdkit.training import batches, loop as train
from svdkit.adapters.api import adapted_layers

from conftest import VOCAB, model_output, perturb_adapters, tiny_model

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
ONLY = dict(lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0)


def only(term: str, **options) -> svdkit.BALoRA:
    """A BA-LoRA config with one regularizer at weight 1 and the others off."""
    return svdkit.BALoRA(rank=2, **{**ONLY, term: 1.0, **options})


def randn(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=GEN(seed)) * scale


def softmax64(z: torch.Tensor) -> torch.Tensor:
    e = (z.double() - z.double().max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def kl_reference(Z, Z0, tau):
    """τ²/n Σ_t Σ_v p0_tv (log p0_tv − log p_tv),  p = softmax(Z/τ), p0 = softmax(Z0/τ)."""
    p, p0 = softmax64(Z / tau), softmax64(Z0 / tau)
    return tau**2 * float((p0 * (p0.log() - p.log())).sum()) / Z.shape[0]


def covariance_reference(Z):
    """1/(d(d−1)) Σ_{i≠j} C_ij²,  C_ij = 1/(n−1) Σ_t (Z_ti − μ_i)(Z_tj − μ_j)."""
    Z = Z.double()
    n, d = Z.shape
    mu = [sum(float(Z[t, i]) for t in range(n)) / n for i in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i != j:
                c = sum((float(Z[t, i]) - mu[i]) * (float(Z[t, j]) - mu[j]) for t in range(n)) / (n - 1)
                total += c * c
    return total / (d * (d - 1))


def entropy_reference(Z):
    """−1/n Σ_t H(softmax(Z_t)),  H(p) = −Σ p log p."""
    p = softmax64(Z)
    return float((p * p.log()).sum()) / Z.shape[0]


def svd_reference(Z, k):
    """−Σ_{i≤k} σ_i / Σ σ_i with σ_i = √λ_i(Z Zᵀ) (eigenvalues, not an SVD routine)."""
    lam = torch.linalg.eigvalsh(Z.double() @ Z.double().T).clamp_min(0).flip(0)
    sigma = lam.sqrt()
    return -float(sigma[:k].sum() / sigma.sum())


# -- each regularizer against its formula ----------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_consistency_is_scaled_kl_to_the_frozen_model(tau):
    Z, Z0 = randn(5, 7, seed=1), randn(5, 7, seed=2)
    got = only("lambda_consistency", temperature=tau).output_regularizer(Z, Z0)
    assert float(got) == pytest.approx(kl_reference(Z, Z0, tau), rel=1e-5)
    assert float(only("lambda_consistency").output_regularizer(Z, Z.clone())) == pytest.approx(0.0, abs=1e-6)
    # KL(p0 ‖ p), not KL(p ‖ p0): the frozen model's distribution is the target
    assert float(got) != pytest.approx(kl_reference(Z0, Z, tau), rel=1e-3)


@pytest.mark.parametrize("n,d", [(9, 4), (5, 12)])  # C formed directly / through the n × n Gram matrix
def test_diversity_is_mean_squared_off_diagonal_covariance(n, d):
    Z = randn(n, d, seed=3) + randn(n, 1, seed=4)  # a shared component: correlated columns
    got = only("lambda_diversity").output_regularizer(Z, None)
    assert float(got) == pytest.approx(covariance_reference(Z), rel=1e-4)
    decorrelated = torch.linalg.qr(randn(n, d, seed=5))[0] if d <= n else None  # orthonormal columns, mean ~0
    if decorrelated is not None:
        Zc = decorrelated - decorrelated.mean(0)
        assert float(only("lambda_diversity").output_regularizer(Zc, None)) < float(got)


def test_diversity_entropy_option():
    Z = randn(6, 10, seed=6)
    got = only("lambda_diversity", diversity="entropy").output_regularizer(Z, None)
    assert float(got) == pytest.approx(entropy_reference(Z), rel=1e-5)
    uniform = only("lambda_diversity", diversity="entropy").output_regularizer(torch.zeros(3, 10), None)
    assert float(uniform) == pytest.approx(-torch.log(torch.tensor(10.0)).item(), rel=1e-6)  # −max entropy


@pytest.mark.parametrize("k", [1, 3, 10])
def test_svd_term_is_minus_the_top_k_share(k):
    Z = randn(5, 8, seed=7)
    got = only("lambda_svd", svd_k=k).output_regularizer(Z, None)
    assert float(got) == pytest.approx(svd_reference(Z, k), rel=1e-5)
    if k >= 5:
        assert float(got) == pytest.approx(-1.0, rel=1e-6)
    rank_one = randn(5, 1, seed=8) @ randn(1, 8, seed=9)
    assert float(only("lambda_svd", svd_k=1).output_regularizer(rank_one, None)) == pytest.approx(-1.0, rel=1e-4)


def test_total_is_the_weighted_sum_with_the_paper_defaults():
    cfg = svdkit.BALoRA(rank=2)
    assert (cfg.lambda_consistency, cfg.lambda_diversity, cfg.lambda_svd, cfg.temperature, cfg.svd_k) == (
        0.025, 0.005, 0.005, 2.0, 10)  # fmt: skip
    Z, Z0 = randn(6, 9, seed=10), randn(6, 9, seed=11)
    want = 0.025 * kl_reference(Z, Z0, 2.0) + 0.005 * covariance_reference(Z) + 0.005 * svd_reference(Z, 10)
    assert float(cfg.output_regularizer(Z, Z0)) == pytest.approx(want, rel=1e-5)
    assert cfg.output_regularizer(torch.zeros(0, 9), torch.zeros(0, 9)) is None  # no labelled position


# -- the method: PiSSA's init, parameter count, export ---------------------------------------------
def test_init_parameters_and_flags_are_pissa():
    cfg = svdkit.BALoRA(rank=8)
    layer = nn.Linear(576, 1536)  # SmolLM2-135M's up_proj shape
    a = svdkit.adapt(nn.Sequential(copy.deepcopy(layer)), cfg)
    p = svdkit.adapt(nn.Sequential(copy.deepcopy(layer)), svdkit.PiSSA(rank=8))
    assert sum(t.numel() for t in a.parameters() if t.requires_grad) == 8 * (576 + 1536)  # r(m + n)
    for (n1, t1), (n2, t2) in zip(a.state_dict().items(), p.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    assert svdkit.config("ba_lora") == svdkit.BALoRA() and not isinstance(cfg, svdkit.PiSSA)  # shares a function
    assert (cfg.lr, cfg.basis, cfg.params) == (svdkit.PiSSA.lr, svdkit.PiSSA.basis, svdkit.PiSSA.params)
    assert cfg.uses_outputs and cfg.needs_base_outputs
    assert not svdkit.BALoRA(lambda_consistency=0).needs_base_outputs
    assert not svdkit.BALoRA(**ONLY).uses_outputs and not svdkit.PiSSA().uses_outputs


def test_export_is_rank_2r(tmp_path):
    model = svdkit.adapt(tiny_model("llama"), svdkit.BALoRA(rank=4, targets="q_proj"))
    perturb_adapters(model)
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(lambda_svd=-0.1), "lambda_svd must be a number >= 0"),
        (dict(temperature=0), "temperature must be a positive number"),
        (dict(svd_k=0), "svd_k must be a positive integer"),
        (dict(diversity="entropy-topk"), "diversity must be one of ('covariance', 'entropy')"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=f"BALoRA: {message}".replace("(", r"\(").replace(")", r"\)")):
        svdkit.BALoRA(**options)


def test_consistency_without_base_outputs_is_an_error():
    with pytest.raises(ValueError, match=r"frozen model's outputs of shape \(2, 3\), got None"):
        svdkit.BALoRA().output_regularizer(torch.zeros(2, 3), None)


# -- adapters_disabled: the original model ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapters_disabled_is_the_original_model_bit_for_bit(arch, ids):
    original = tiny_model(arch)
    with torch.no_grad():
        ref = model_output(original, ids)
    model = svdkit.adapt(copy.deepcopy(original), svdkit.BALoRA(rank=4))
    perturb_adapters(model)
    with torch.no_grad():
        with svdkit.adapters_disabled(model):
            off = model_output(model, ids)
        on = model_output(model, ids)
    assert torch.equal(off, ref)
    assert not torch.allclose(on, ref, atol=1e-4)  # the flag is restored after the block
    assert not any(layer.adapter_disabled for _, layer in adapted_layers(model))


@pytest.mark.parametrize("method,options", [("ba-lora", {}), ("svft", {})])  # svft: the weight is dropped
def test_adapters_disabled_with_fold(method, options, ids):
    original = tiny_model("llama")
    with torch.no_grad():
        ref = model_output(original, ids)
    model = svdkit.adapt(copy.deepcopy(original), svdkit.config(method, rank=4, fold=True, **options))
    assert all(layer.folded for _, layer in adapted_layers(model))
    perturb_adapters(model)
    with torch.no_grad(), svdkit.adapters_disabled(model):
        off = model_output(model, ids)
    assert float((off - ref).abs().max()) <= 1e-5 * max(1.0, float(ref.abs().max()))


def test_adapters_disabled_needs_an_adapted_model():
    with pytest.raises(ValueError, match="no svdkit adapters"):
        with svdkit.adapters_disabled(nn.Linear(3, 3)):
            pass


# -- output_regularization on a model ---------------------------------------------------------------
def _batch(seed=0, b=3, t=10):
    ids = torch.randint(0, VOCAB, (b, t), generator=GEN(seed))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[0, -2:] = -100  # padding
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_regularizers_see_the_logits_the_task_loss_scores():
    model, batch = tiny_model("llama"), _batch()
    logits, targets = batches.labelled_logits(model, batch)
    full = model(input_ids=batch["input_ids"]).logits
    assert torch.allclose(logits, batches.select_labelled(full, batch["labels"]), atol=1e-6)
    assert logits.shape == (int((batch["labels"][:, 1:] != -100).sum()), VOCAB)
    assert torch.equal(targets, batch["labels"][:, 1:][batch["labels"][:, 1:] != -100])


def test_gradients_reach_only_the_adapters():
    model = svdkit.adapt(tiny_model("llama"), svdkit.BALoRA(rank=4)).train()
    batch = _batch()
    logits, _ = batches.labelled_logits(model, batch)
    at_init = svdkit.output_regularization(model, batch, logits)
    kl_only = svdkit.BALoRA(rank=4, **{**ONLY, "lambda_consistency": 1.0})
    assert float(kl_only.output_regularizer(logits.detach(), api.base_outputs(model, batch))) == pytest.approx(0, abs=1e-6)
    perturb_adapters(model, scale=0.2)
    logits, _ = batches.labelled_logits(model, batch)
    base = api.base_outputs(model, batch)
    assert not base.requires_grad and model.training  # modes restored
    reg = svdkit.output_regularization(model, batch, logits)
    assert float(reg) != pytest.approx(float(at_init), rel=1e-3)
    assert float(kl_only.output_regularizer(logits, base)) > 1e-6  # the model moved away from the original
    reg.backward()
    adapter = {id(p) for _, layer in adapted_layers(model) for _, p in layer.adapter_parameters()}
    grads = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all(id(p) in adapter for _, p in grads)
    assert sum(float(p.grad.abs().sum()) for _, p in grads) > 0
    assert all(p.grad is None for n, p in model.named_parameters() if id(p) not in adapter)


def test_no_output_regularizer_means_no_extra_forward(monkeypatch):
    calls = []
    monkeypatch.setattr(api, "base_outputs", lambda *a, **k: calls.append(1))
    for cfg in (svdkit.PiSSA(rank=2), svdkit.BALoRA(rank=2, lambda_consistency=0)):
        model = svdkit.adapt(tiny_model("llama"), cfg)
        logits, _ = batches.labelled_logits(model, _batch())
        svdkit.output_regularization(model, _batch(), logits)
    assert calls == []
    assert float(svdkit.output_regularization(
        svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2)), _batch(), torch.ones(2, 3))) == 0.0  # fmt: skip


# -- svdkit's train_step ----------------------------------------------------------------------------
def _items(n=8, seed=0):
    g = GEN(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (8 + i % 4,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100, -100] + ids[3:]})
    return out


def _train(cfg, steps=4, per=4, monkeypatch=None):
    model = svdkit.adapt(tiny_model("llama"), cfg).train()
    loop = train.make_optimizer(model, lr=5e-3, weight_decay=0.0, total=steps, warmup=1)
    losses = []
    for step in range(steps):
        items = batches.batch_at(_items(), step, 8, 0)
        mbs = [batches.collate(items[i : i + per], 0) for i in range(0, 8, per)]
        losses.append(train.train_step(model, model, mbs, loop, max_grad_norm=1.0, peak_lr=5e-3, total=steps)["loss"])
    return model, losses


def test_train_step_applies_the_regularizers(monkeypatch):
    calls = []
    real = api.base_outputs
    monkeypatch.setattr(api, "base_outputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, pissa = _train(svdkit.PiSSA(rank=4))
    assert calls == []  # zero cost for methods without output regularizers
    strong = dict(lambda_consistency=1.0, lambda_diversity=1.0, lambda_svd=1.0)
    model, balora = _train(svdkit.BALoRA(rank=4, **strong))
    assert len(calls) == 4 * 2  # one frozen-model forward per micro-batch
    assert balora[0] == pytest.approx(pissa[0], rel=1e-6)  # same init: same first task loss
    assert all(abs(a - b) > 1e-6 for a, b in zip(balora[1:], pissa[1:]))  # the regularizers changed training
    assert all(torch.isfinite(torch.tensor(balora)))
    assert not any(layer.adapter_disabled for _, layer in adapted_layers(model))
