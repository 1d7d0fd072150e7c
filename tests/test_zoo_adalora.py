"""AdaLoRA (METHODS.md §16): the update, the count, the regularizer, the budget schedule and pruning, the
export at rank nnz(λ), parity with PEFT's AdaLoraModel/RankAllocator, and a short svdkit training run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import svdkit
from svdkit.training import loop as train
from svdkit.adapters.api import adapted_layers
from svdkit.adapters.zoo.adalora import budget_schedule, ranks

from conftest import perturb_adapters, tiny_model

GEN = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def linear_model(*shapes: tuple[int, int], seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(n, m) for m, n in shapes]).eval()


def frob(M: torch.Tensor) -> torch.Tensor:
    return M.square().sum().sqrt()


def orth_term(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """‖PᵀP − I‖_F + ‖QQᵀ − I‖_F, written out."""
    r = P.shape[1]
    return frob(P.T @ P - torch.eye(r)) + frob(Q @ Q.T - torch.eye(r))


# -- the parametrization ---------------------------------------------------------------------------------
def test_update_is_scaled_p_diag_lambda_q_and_zero_at_init():
    model = linear_model((12, 9))
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    x = torch.randn(5, 9, generator=GEN(1))
    svdkit.adapt(model, svdkit.AdaLoRA(rank=4, target_r=2, alpha=6.0))
    layer = model[0]
    assert torch.equal(layer.core.value, torch.zeros(4))  # λ = 0: the original function
    with torch.no_grad():
        torch.testing.assert_close(model(x), x @ W.T + b)
        lam = torch.randn(4, generator=GEN(2))
        layer.core.value.copy_(lam)
        P, Q = layer.lora_B.detach(), layer.lora_A.detach()
        assert P.shape == (12, 4) and Q.shape == (4, 9)
        torch.testing.assert_close(model(x), x @ (W + (6.0 / 4) * P @ torch.diag(lam) @ Q).T + b)


def test_p_and_q_are_seeded_gaussians_with_std_002():
    a, b = linear_model((576, 1536), (576, 1536)), linear_model((576, 1536), (576, 1536))
    svdkit.adapt(a, svdkit.AdaLoRA(rank=12))
    svdkit.adapt(b, svdkit.AdaLoRA(rank=12))
    for factor in ("lora_A", "lora_B"):
        x = getattr(a[0], factor).detach()
        assert abs(float(x.mean())) < 2e-3 and abs(float(x.std()) / 0.02 - 1) < 0.05
        assert torch.equal(x, getattr(b[0], factor))  # same seed and name: the same draw
        assert not torch.equal(x, getattr(a[1], factor))  # another layer name: another draw


def test_trainable_parameters_are_r0_times_m_plus_n_plus_1():
    model = svdkit.adapt(linear_model((576, 1536)), svdkit.AdaLoRA(rank=12))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 12 * (576 + 1536 + 1)


# -- the regularizer -------------------------------------------------------------------------------------
def test_regularizer_is_gamma_times_the_mean_over_factor_matrices():
    cfg = svdkit.AdaLoRA(rank=3, target_r=1, orth_reg_weight=0.3)
    model = svdkit.adapt(linear_model((12, 9), (9, 12), (7, 9)), cfg)
    perturb_adapters(model, scale=0.3)
    terms = [orth_term(layer.lora_B.detach(), layer.lora_A.detach()) for layer in model]
    expected = 0.3 * sum(terms) / (2 * 3)  # PEFT: Σ of 2L factor norms / 2L
    torch.testing.assert_close(svdkit.regularization(model), expected)
    svdkit.regularization(model).backward()  # it is a differentiable loss term
    assert all(layer.lora_A.grad is not None and layer.lora_B.grad is not None for layer in model)
    off = svdkit.adapt(linear_model((12, 9)), svdkit.AdaLoRA(rank=3, target_r=1, orth_reg_weight=0.0))
    assert float(svdkit.regularization(off)) == 0.0


def _peft_adalora(base, T, **options):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=4, lora_dropout=0.0, target_modules=LLAMA_TARGETS,
                        total_step=T, **options)  # fmt: skip
    return get_peft_model(copy.deepcopy(base), cfg)


def _copy_into_peft(ours, theirs):
    """P, Q, λ into PEFT's lora_B, lora_A, lora_E; ranknum set so that PEFT's α/(ranknum + 1e-5) is α/r₀."""
    with torch.no_grad():
        for name, layer in adapted_layers(ours):
            t = theirs.base_model.model.get_submodule(name)
            t.lora_A["default"].copy_(layer.lora_A)
            t.lora_B["default"].copy_(layer.lora_B)
            t.lora_E["default"].copy_(layer.core.value[:, None])
            t.ranknum["default"].fill_(layer.rank - 1e-5)


def test_regularizer_equals_peft_s_mean_over_factor_matrices(ids):
    """PEFT divides by the number of factor matrices (2 per layer), and so does svdkit (issue 12)."""
    base = tiny_model("llama")
    ours = svdkit.adapt(copy.deepcopy(base), svdkit.AdaLoRA(rank=4, target_r=2, orth_reg_weight=0.5))
    perturb_adapters(ours, scale=0.2)
    theirs = _peft_adalora(base, 10, orth_reg_weight=0.5)
    _copy_into_peft(ours, theirs)
    with torch.no_grad():
        plain = ours(input_ids=ids, labels=ids).loss
        peft_reg = theirs.base_model(input_ids=ids, labels=ids).loss - plain  # AdaLoraModel.forward adds it
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(svdkit.regularization(ours), peft_reg, atol=1e-5, rtol=1e-5)


# -- the budget schedule and pruning ---------------------------------------------------------------------
def test_budget_schedule_values():
    T, ti, tf, b0, bT = 15, 2, 3, 48, 16
    for t in range(1, T + 1):
        if t <= ti:
            want = b0
        elif t > T - tf:
            want = bT
        else:
            want = math.floor(bT + (b0 - bT) * (1 - (t - ti) / (T - ti - tf)) ** 3)
        budget, allocate = budget_schedule(t, T, b0, bT, ti, tf, 2)
        assert budget == want, t
        assert allocate == (ti < t and (t >= T - tf or t % 2 == 0)), t
    # 16 + 32·0.9³ and 16 + 32·0.6³, floored
    assert [budget_schedule(t, T, b0, bT, ti, tf, 1)[0] for t in (3, 6, 12)] == [39, 22, 16]


def _scores_after_one_update(layer, grads, beta1, beta2):
    """Sᵢ after one EMA update from zero: Ī = (1−β₁)I, Ū = (1−β₂)|I − Ī| = (1−β₂)β₁I, s = Ī·Ū."""
    s = {}
    for key, p in (("P", layer.lora_B), ("lam", layer.core.value), ("Q", layer.lora_A)):
        sens = (p.detach() * grads[key]).abs()
        s[key] = (1 - beta1) * sens * (1 - beta2) * beta1 * sens
    return s["lam"] + s["Q"].mean(1) + s["P"].mean(0)


def test_allocation_prunes_the_lowest_triplets_and_holds_them_at_zero():
    cfg = svdkit.AdaLoRA(rank=4, target_r=1, deltaT=2, beta1=0.7, beta2=0.8)
    model = svdkit.adapt(linear_model((12, 9), (10, 12)), cfg)
    perturb_adapters(model, scale=0.5)  # all λᵢ ≠ 0
    g = GEN(3)
    grads = [{k: torch.randn(p.shape, generator=g) for k, p in (("P", m.lora_B), ("lam", m.core.value), ("Q", m.lora_A))}
             for m in model]  # fmt: skip
    for layer, gr in zip(model, grads):
        layer.lora_B.grad, layer.core.value.grad, layer.lora_A.grad = gr["P"], gr["lam"], gr["Q"]
    scores = torch.cat([_scores_after_one_update(layer, gr, 0.7, 0.8) for layer, gr in zip(model, grads)])
    svdkit.after_clipping(model, 1e-3)
    before = torch.cat([layer.core.value.detach().clone() for layer in model])
    svdkit.after_step(model, 1, 10)  # 1 % ΔT ≠ 0: no allocation yet
    assert torch.equal(torch.cat([layer.core.value for layer in model]), before)
    svdkit.after_step(model, 2, 10)
    budget = math.floor(2 + (8 - 2) * (1 - 2 / 10) ** 3)  # b₀ = 8 triplets, b_T = 1 × 2 layers
    pruned = set(torch.argsort(scores)[: 8 - budget].tolist())
    lam = torch.cat([layer.core.value.detach() for layer in model])
    assert {i for i in range(8) if lam[i] == 0} == pruned
    assert all(lam[i] == before[i] for i in range(8) if i not in pruned)
    assert sum(ranks(model).values()) == budget
    with torch.no_grad():  # an optimizer step moves every λᵢ; the pruned ones are held at 0 until step 4
        for layer in model:
            layer.core.value.add_(0.1)
    svdkit.after_step(model, 3, 10)
    lam = torch.cat([layer.core.value.detach() for layer in model])
    assert {i for i in range(8) if lam[i] == 0} == pruned


def test_bad_options_and_a_schedule_without_a_pruning_phase_are_refused():
    for options, message in [({"target_r": 5, "rank": 4}, "target_r"), ({"target_r": 0}, "target_r"),
                             ({"beta1": 1.0}, "beta1"), ({"beta2": 0}, "beta2"), ({"deltaT": 0}, "deltaT"),
                             ({"tinit": -1}, "tinit"), ({"tfinal": 1.5}, "tfinal"),
                             ({"orth_reg_weight": -0.1}, "orth_reg_weight")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"AdaLoRA: {message}"):
            svdkit.AdaLoRA(**options)
    model = svdkit.adapt(linear_model((12, 9)), svdkit.AdaLoRA(rank=4, target_r=2, tinit=5, tfinal=5))
    with pytest.raises(ValueError, match="no pruning phase in 10 training steps"):
        svdkit.after_step(model, 1, 10)
    with pytest.raises(ValueError, match="no AdaLoRA layers"):
        ranks(svdkit.adapt(linear_model((12, 9)), svdkit.LoRA(rank=2)))


# -- export at rank nnz(λ) -------------------------------------------------------------------------------
def test_export_has_rank_nnz_lambda_per_layer_and_loads_in_peft(ids, tmp_path):
    from peft import PeftModel

    model = svdkit.adapt(tiny_model("llama"), svdkit.AdaLoRA(rank=4, target_r=2, alpha=8.0))
    perturb_adapters(model)
    with torch.no_grad():
        for i, (_, layer) in enumerate(adapted_layers(model)):
            layer.core.value[: i % 5] = 0  # 0 … 4 pruned triplets (all four: an all-zero update)
        y = model(input_ids=ids).logits
    nnz = ranks(model)
    assert sorted(set(nnz.values())) == [0, 1, 2, 3, 4]
    svdkit.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    exported = {name: config["rank_pattern"].get(name.replace(".", r"\."), config["r"]) for name in nnz}
    assert exported == {name: max(r, 1) for name, r in nnz.items()}  # r ≥ 1 for PEFT: one zero direction kept
    for name, r in exported.items():  # α'/r' = s = 8/4 in every layer
        assert config["alpha_pattern"].get(name.replace(".", r"\."), config["lora_alpha"]) == pytest.approx(2 * r)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, y, atol=1e-5, rtol=0)


# -- parity with PEFT's RankAllocator -----------------------------------------------------------------------
def test_budget_and_masks_match_peft_rank_allocator():
    """Same P, Q, λ and, at every step, the same weight change and gradients: the same budgets and pruned λ.

    PEFT scores after the optimizer step; here the hooks see the same (w, ∂L/∂w) pair because the test applies
    each step's weight change before calling after_clipping (in svdkit's loop it runs before the step)."""
    T, options = 10, dict(tinit=2, tfinal=3, beta1=0.85, beta2=0.85)
    base = tiny_model("llama")
    ours = svdkit.adapt(copy.deepcopy(base), svdkit.AdaLoRA(rank=4, target_r=2, alpha=4.0, **options))
    theirs = _peft_adalora(base, T, **options)
    _copy_into_peft(ours, theirs)
    layers = dict(adapted_layers(ours))
    allocator = theirs.base_model.rankallocator
    g = GEN(7)
    for t in range(1, T + 1):
        assert budget_schedule(t, T, 56, 28, 2, 3, 1)[0] == allocator.budget_schedule(t)[0]
        with torch.no_grad():
            for name, layer in layers.items():
                peft_layer = theirs.base_model.model.get_submodule(name)
                pairs = ((layer.lora_A, peft_layer.lora_A["default"]), (layer.lora_B, peft_layer.lora_B["default"]),
                         (layer.core.value, peft_layer.lora_E["default"]))  # fmt: skip
                for mine, peft_p in pairs:
                    grad = torch.randn(mine.shape, generator=g)
                    mine.sub_(0.05 * grad)
                    peft_p.sub_(0.05 * grad.view(peft_p.shape))
                    mine.grad, peft_p.grad = grad.clone(), grad.view(peft_p.shape).clone()
        svdkit.after_clipping(ours, 1e-3)
        svdkit.after_step(ours, t, T)
        theirs.base_model.update_and_allocate(t)
        for name, layer in layers.items():
            peft_lam = theirs.base_model.model.get_submodule(name).lora_E["default"].view(-1)
            assert torch.equal(layer.core.value == 0, peft_lam == 0), (t, name)
            torch.testing.assert_close(layer.core.value, peft_lam, atol=0, rtol=0)
        pattern = theirs.peft_config["default"].rank_pattern
        if t > options["tinit"]:
            assert sum(ranks(ours).values()) == sum(sum(v) for v in pattern.values())
    assert sum(ranks(ours).values()) == 28


# -- the schedule inside svdkit's training loop ------------------------------------------------------------------
def _run(model, ids, T):
    loop = train.make_optimizer(model, lr=5e-3, weight_decay=0.0, total=T, warmup=1)
    batch = [{"input_ids": ids, "labels": ids}]
    history, losses = [], []
    for _ in range(T):
        row = train.train_step(model, model, batch, loop, max_grad_norm=1.0, peak_lr=5e-3, total=T)
        history.append(ranks(model))
        losses.append(row["loss"])
    return history, losses


def test_svdkit_training_loop_runs_the_schedule_down_to_the_target_budget(ids):
    model = svdkit.adapt(tiny_model("llama"), svdkit.AdaLoRA(rank=4, target_r=2, tinit=2, tfinal=2))
    for run in range(2):  # a second run on the same model starts its schedule afresh
        history, losses = _run(model, ids, 8)
        totals = [sum(r.values()) for r in history]
        assert totals[:2] == [56, 56], run  # warm-up: every λᵢ trained away from 0, nothing pruned
        assert all(a >= b for a, b in zip(totals, totals[1:])) and totals[2] < 56
        assert totals[-3:] == [28, 28, 28]  # b_T = target_r × 14 layers, fixed from step T − t_f
        assert history[-1] == history[-3]  # the final allocation is held
        assert max(history[-1].values()) <= 4 and losses[-1] < losses[0]
