"""EVA (METHODS.md §11, https://arxiv.org/abs/2410.07170) against its definition written out here: incremental
PCA = the batch PCA of the centred stacked rows, EVA's convergence stop, rank redistribution over the pooled
explained-variance ratios, A = top components (whitened: /√σ), B = 0, and parity with PEFT's EVA."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import svdkit
from svdkit.adapters.api import adapted_layers
from svdkit.core.calibration import Calibration
from svdkit.core.ipca import explained_variance_ratio, ipca_converged, ipca_start, ipca_update
from svdkit.adapters.zoo.eva import ActivationPCA, redistribute_ranks

from conftest import VOCAB, calibration_batches, model_output, tiny_model

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch_pca(X: torch.Tensor, c: int):
    """Reference: top-c right singular vectors of the centred rows (largest |entry| of each made positive),
    their singular values, and σ²/‖X − μ‖²."""
    Xc = X - X.mean(0)
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    V = Vh[:c]
    V = V * V.gather(1, V.abs().argmax(1, keepdim=True)).sign()
    return V, S[:c], S[:c] ** 2 / Xc.square().sum()


def low_rank_rows(rows: int, n: int, rank: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Rows in a rank-`rank` affine subspace of ℝⁿ (plus isotropic noise), decaying spectrum."""
    g = gen(seed)
    basis = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=F64)).Q.T
    scales = torch.linspace(5.0, 1.0, rank, dtype=F64)
    X = (torch.randn(rows, rank, generator=g, dtype=F64) * scales) @ basis + 3 * torch.randn(n, generator=g, dtype=F64)
    return X + noise * torch.randn(rows, n, generator=g, dtype=F64)


def streamed(X: torch.Tensor, c: int, sizes, **options):
    state = ipca_start(X.shape[1], c)
    for part in X.split(sizes):
        ipca_update(state, part, **options)
    return state


# -- incremental PCA --------------------------------------------------------------------------------
@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_incremental_pca_equals_batch_pca_on_low_rank_data(svd):
    """Rank-c data: the truncated incremental update loses nothing, so it equals the batch PCA to rounding
    (irregular batches, the first smaller than c)."""
    c, X = 5, low_rank_rows(203, 20, 5)
    state = streamed(X, c, [3, 40, 1, 77, 82], svd=svd)
    V, S, ratio = batch_pca(X, c)
    assert torch.allclose(state["components"], V, atol=1e-10)
    assert torch.allclose(state["singular_values"], S, rtol=1e-10)
    assert torch.allclose(explained_variance_ratio(state), ratio, rtol=1e-10)
    assert torch.allclose(state["mean"], X.mean(0), atol=1e-12)
    assert int(state["count"]) == 203 and int(state["steps"]) == 5


def test_incremental_pca_approximates_batch_pca_on_noisy_data():
    """Full-rank data with a spectral gap: the streamed top-c subspace is the batch one up to small angles."""
    c, X = 6, low_rank_rows(600, 24, 6, noise=0.05, seed=1)
    state = streamed(X, c, 50)
    V, S, ratio = batch_pca(X, c)
    cosines = torch.linalg.svdvals(state["components"] @ V.T)  # cosines of the principal angles
    assert float(cosines.min()) > 1 - 1e-6
    assert torch.allclose(explained_variance_ratio(state), ratio, rtol=1e-3)
    assert float(ratio.sum()) < 1  # the noise outside the top c is not explained


def test_first_batch_smaller_than_c_gives_zero_components_until_more_rows():
    X = low_rank_rows(30, 10, 4)
    state = ipca_start(10, 4)
    ipca_update(state, X[:2], svd="exact")
    assert torch.equal(state["singular_values"][2:], torch.zeros(2, dtype=F64))
    assert torch.equal(state["components"][2:], torch.zeros(2, 10, dtype=F64))
    ipca_update(state, X[2:], svd="exact")
    V, S, _ = batch_pca(X, 4)
    assert torch.allclose(state["components"], V, atol=1e-10) and torch.allclose(state["singular_values"], S)


def test_convergence_is_cosine_of_consecutive_components():
    X = low_rank_rows(40, 12, 12, seed=2)
    state = ipca_start(12, 4)
    ipca_update(state, X, svd="exact")
    assert not ipca_converged(state, 0.0)  # nothing to compare with after one update
    before = state["components"].clone()
    ipca_update(state, X, svd="exact")  # the same rows again: the PCA of [X; X] is the PCA of X
    assert torch.allclose(state["similarity"], (state["components"] * before).sum(1).abs())
    assert ipca_converged(state, 0.99)
    ipca_update(state, low_rank_rows(40, 12, 12, seed=3), svd="exact")  # new data moves the components
    sim = state["similarity"]
    assert ipca_converged(state, float(sim.min())) and not ipca_converged(state, float(sim.min()) + 1e-9)


def test_calibration_stops_once_every_module_converged():
    """svdkit.calibrate stops at the first batch after which every module's PCA is stable."""
    batch = calibration_batches(1)[0]
    stats = svdkit.calibrate(tiny_model("llama"), [batch] * 6, svdkit.EVA(rank=2, svd="exact"), progress=False)
    assert stats.batches == 2
    with pytest.warns(UserWarning, match="did not converge"):
        stats = svdkit.calibrate(tiny_model("llama"), calibration_batches(4), svdkit.EVA(rank=2, tau=1.0),
                                 progress=False)
    assert stats.batches == 4  # τ = 1 is never met on changing data: every batch is used (with a warning)


@pytest.mark.filterwarnings("ignore:EVA's incremental PCA did not converge")
def test_statistic_measures_labelled_tokens_only_by_default():
    """One batch, exact SVD: the statistic of o_proj is the batch PCA of its inputs at labelled positions."""
    model, batch, seen = tiny_model("llama"), calibration_batches(1)[0], []
    module = model.model.layers[0].self_attn.o_proj
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().double()))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    name = "model.layers.0.self_attn.o_proj"
    for label_mask, positions in ((True, batch["labels"] != -100), (False, batch["attention_mask"].bool())):
        cfg = svdkit.EVA(rank=3, svd="exact", label_mask=label_mask)
        stats = svdkit.calibrate(model, [batch], cfg, progress=False)
        assert stats.tokens == int(positions.sum())
        V, S, ratio = batch_pca(seen[0][positions], 6)
        assert torch.allclose(stats[name]["components"].double(), V, atol=1e-4)
        assert torch.allclose(stats[name]["explained_variance_ratio"].double(), ratio, rtol=1e-4)


# -- rank redistribution ----------------------------------------------------------------------------
def test_redistribution_keeps_the_budget_and_drops_empty_layers():
    ratios = {"a": torch.tensor([0.50, 0.30, 0.10, 0.05]), "b": torch.tensor([0.40, 0.20, 0.02, 0.01]),
              "c": torch.tensor([0.04, 0.03, 0.02, 0.01])}  # fmt: skip
    ranks = redistribute_ranks(ratios, 6, dict.fromkeys(ratios, 4))
    # the global top 6: .50 .40 .30 .20 .10 .05 → a: 4, b: 2, c: 0
    assert ranks == {"a": 4, "b": 2, "c": 0} and sum(ranks.values()) == 6
    capped = redistribute_ranks(ratios, 6, {"a": 2, "b": 4, "c": 4})  # a competes with .50 .30 only
    assert capped == {"a": 2, "b": 2, "c": 2}  # .50 .40 .30 .20 .04 .03
    short = redistribute_ranks({"a": torch.tensor([0.6, 0.0])}, 2, {"a": 2})  # zero ratio: never measured
    assert short == {"a": 1}


def test_redistribution_ties_go_to_the_earlier_layer():
    same = torch.tensor([0.5, 0.25])
    assert redistribute_ranks({"q": same, "k": same, "v": same}, 4, dict.fromkeys("qkv", 2)) == {"q": 2, "k": 1, "v": 1}


def hand_calibration(ratios: dict[str, list[float]], n: int = 8) -> Calibration:
    tensors = {name: {"explained_variance_ratio": torch.tensor(r), "components": torch.eye(len(r), n),
                      "singular_values": torch.ones(len(r))} for name, r in ratios.items()}  # fmt: skip
    return Calibration({}, tensors, aliases={}, fingerprints=dict.fromkeys(ratios, ""), samples=1, tokens=1, batches=1)


def test_resolve_sets_per_layer_ranks_alphas_and_excludes():
    names = ["m.layers.1.q", "m.layers.10.q", "m.layers.2.q"]
    calib = hand_calibration({names[0]: [0.5, 0.4, 0.3, 0.2], names[1]: [0.05, 0.04, 0.03, 0.02],
                              names[2]: [0.45, 0.35, 0.01, 0.005]})  # fmt: skip
    shapes = dict.fromkeys(names, (8, 8))
    cfg = svdkit.EVA(rank=2, alpha=3.0)
    resolved = cfg.resolve(calib, shapes)
    # top 6 of the pool: .5 .45 .4 .35 .3 .2 → ranks 4, 0, 2
    assert resolved.for_module(names[0]).rank == 4 and resolved.for_module(names[0]).alpha == 3.0 * 4 / 2
    assert resolved.for_module(names[2]).rank == 2 and resolved.for_module(names[2]).alpha == 3.0
    assert all(math.isclose(resolved.for_module(n).scaling, cfg.scaling) for n in (names[0], names[2]))
    assert re.search(resolved.exclude, names[1])  # "layers.1" must not exclude "layers.10" and vice versa
    assert not any(re.search(resolved.exclude, n) for n in (names[0], names[2]))
    assert resolved.resolve(calib, {n: shapes[n] for n in (names[0], names[2])}) == resolved  # idempotent
    rs = svdkit.EVA(rank=2, alpha=3.0, use_rslora=True, exclude="lm_head").resolve(calib, shapes)
    assert math.isclose(rs.for_module(names[0]).alpha, 3.0 * math.sqrt(2))  # s = α/√r kept under rsLoRA
    assert math.isclose(rs.for_module(names[0]).scaling, svdkit.EVA(rank=2, alpha=3.0, use_rslora=True).scaling)
    assert re.search(rs.exclude, "lm_head") and re.search(rs.exclude, names[1])
    small = cfg.resolve(calib, {names[0]: (3, 8), names[1]: (8, 8), names[2]: (8, 8)})  # rank < min(m, n) = 3
    assert small.for_module(names[0]).rank == 2


# -- adapting a model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_stats():
    model = tiny_model("llama")
    cfg = svdkit.EVA(rank=4)
    with pytest.warns(UserWarning, match="did not converge"):
        stats = svdkit.calibrate(model, calibration_batches(3), cfg, progress=False)
    return cfg, stats


def test_init_is_top_components_and_zero_b(llama_stats):
    cfg, stats = llama_stats
    for whiten in (False, True):
        c = svdkit.EVA(rank=4, whiten=whiten)
        model = svdkit.adapt(tiny_model("llama"), c, calibration=stats)
        for name, layer in adapted_layers(model):
            r = model._svdkit.module_configs[name].rank
            V, S = stats[name]["components"][:r], stats[name]["singular_values"][:r]
            expected = V / S.sqrt()[:, None] if whiten else V
            assert torch.allclose(layer.lora_A, expected) and layer.lora_A.shape == (r, layer.in_features)
            assert torch.equal(layer.lora_B, torch.zeros(layer.out_features, r)) and layer.init_A is None
            assert math.isclose(layer.scaling, 1.0 / 4)  # α_l/r_l′ = α/r


def test_parameter_count_is_sum_of_redistributed_ranks(llama_stats):
    cfg, stats = llama_stats
    model = tiny_model("llama")
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    svdkit.adapt(model, cfg, calibration=stats)
    ranks = {n: model._svdkit.module_configs[n].rank for n, _ in adapted_layers(model)}
    assert sum(ranks.values()) == cfg.rank * len(shapes)  # the uniform budget (no layer capped here)
    assert len(set(ranks.values())) > 1  # the ranks did move
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(r * sum(shapes[n]) for n, r in ranks.items())


def test_saved_config_shows_ranks_and_a_dropped_layer_is_not_adapted(llama_stats, tmp_path):
    cfg, stats = llama_stats
    dropped = "model.layers.1.self_attn.o_proj"  # made to explain almost nothing: it gets rank 0
    tensors = dict(stats.tensors)
    tensors[dropped] = dict(tensors[dropped])
    tensors[dropped]["explained_variance_ratio"] = tensors[dropped]["explained_variance_ratio"] * 1e-6
    stats = Calibration(stats.statistic, tensors, aliases=stats.aliases, fingerprints=stats.fingerprints,
                        samples=stats.samples, tokens=stats.tokens, batches=stats.batches)  # fmt: skip
    model = svdkit.adapt(tiny_model("llama"), cfg, calibration=stats)
    assert isinstance(model.get_submodule(dropped), nn.Linear)
    ranks = {n: c.rank for n, c in model._svdkit.module_configs.items()}
    assert dropped not in ranks and sum(ranks.values()) == 14 * cfg.rank
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen(0))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
        y = model_output(model, ids)
    svdkit.save_adapter(model, tmp_path / "a")
    saved = svdkit.config_from_dict(json.loads((tmp_path / "a" / "svdkit.json").read_text())["config"])
    assert {n: saved.for_module(n).rank for n in ranks} == ranks and re.search(saved.exclude, dropped)
    assert any(v["rank"] != cfg.rank for v in saved.overrides.values())
    fresh = svdkit.load_adapter(tiny_model("llama"), tmp_path / "a")
    assert isinstance(fresh.get_submodule(dropped), nn.Linear)
    with torch.no_grad():
        assert torch.equal(model_output(fresh, ids), y)


def test_export_is_plain_lora_with_rank_pattern(llama_stats, tmp_path):
    cfg, stats = llama_stats
    model = svdkit.adapt(tiny_model("llama"), cfg, calibration=stats)
    svdkit.export_peft(model, tmp_path / "peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = {n: c.rank for n, c in model._svdkit.module_configs.items()}
    exported = {n: peft_cfg["rank_pattern"].get(re.escape(n), peft_cfg["r"]) for n in peft_cfg["target_modules"]}
    assert exported == ranks
    for name, r in ranks.items():  # α_l/r_l′ = α/r for every layer
        alpha = peft_cfg["alpha_pattern"].get(re.escape(name), peft_cfg["lora_alpha"])
        assert math.isclose(alpha / r, cfg.scaling)


# -- options and errors -----------------------------------------------------------------------------
def test_defaults_and_statistic():
    cfg = svdkit.EVA()
    assert (cfg.rank, cfg.alpha, cfg.rho, cfg.tau, cfg.whiten, cfg.label_mask) == (16, 1.0, 2.0, 0.99, False, True)
    stat = svdkit.EVA(rank=5, rho=1.5, label_mask=False, svd="exact", seed=3).statistic()
    assert stat == ActivationPCA(components=8, tau=0.99, tokens="attention", svd="exact", niter=4, seed=3)
    assert stat.kind == "activation_pca" and stat.reduce == "gather" and not stat.needs_grad


@pytest.mark.parametrize("options,match", [
    (dict(rho=0.5), "rho .* must be >= 1"),
    (dict(tau=1.5), "tau .* must be in \\[0, 1\\]"),
    (dict(whiten="yes"), "whiten must be True or False"),
    (dict(label_mask=None), "label_mask must be True or False"),
])  # fmt: skip
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=f"EVA: {match}"):
        svdkit.EVA(**options)


@pytest.mark.parametrize("options,match", [
    (dict(components=0), "components must be a positive integer"),
    (dict(tokens="all"), "tokens must be one of"),
    (dict(svd="lanczos"), "svd must be one of"),
])  # fmt: skip
def test_bad_statistic_options(options, match):
    with pytest.raises(ValueError, match=f"ActivationPCA: {match}"):
        ActivationPCA(**options)


def test_errors_name_the_problem(llama_stats):
    cfg, stats = llama_stats
    with pytest.raises(ValueError, match="svdkit.calibrate"):
        svdkit.adapt(tiny_model("llama"), cfg)
    with pytest.raises(ValueError, match="calibration of m.x holds 4 measured components"):
        svdkit.EVA(rank=5).initialize(torch.zeros(1, 8, 8), ["m.x"], hand_calibration({"m.x": [0.4, 0.3, 0.2, 0.1]}))
    with pytest.raises(ValueError, match="expected rows of width 8"):
        ipca_update(ipca_start(8, 2), torch.zeros(4, 7))


# -- parity with PEFT -------------------------------------------------------------------------------
def test_parity_with_peft_eva():
    """Same tiny Llama, same batch (repeated, so both stop after their second update on the PCA of that batch):
    PEFT's initialize_lora_eva_weights and svdkit.EVA give the same ranks, α_l and A subspaces. Deliberate
    differences: ties between layers sharing an input (q/k/v, gate/up) are split by target order here (PEFT:
    by its sort), so only each group's ranks are compared as a multiset; PEFT whitens shared-input layers once
    per layer in place (``u /=`` on a view of its components), so whitening is compared here without it."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    ids = torch.randint(0, VOCAB, (8, 24), generator=gen(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    peft_cfg = LoraConfig(r=4, lora_alpha=1, target_modules="all-linear", init_lora_weights="eva",
                          eva_config=EvaConfig(rho=2.0, tau=0.99))  # fmt: skip
    reference = get_peft_model(tiny_model("llama"), peft_cfg)
    initialize_lora_eva_weights(reference, [batch], show_progress_bar=False)
    theirs = {n.removeprefix("base_model.model."): m for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    theirs = {n: m for n, m in theirs.items() if "default" in m.lora_A}

    model = tiny_model("llama")
    stats = svdkit.calibrate(model, [batch] * 4, svdkit.EVA(rank=4), progress=False)
    assert stats.batches == 2
    svdkit.adapt(model, svdkit.EVA(rank=4), calibration=stats)
    ours = dict(adapted_layers(model))
    assert set(ours) == set(theirs)  # the same layers dropped (if any)
    groups: dict[str, list[str]] = {}
    for name in ours:
        groups.setdefault(stats.aliases.get(name, name), []).append(name)
    for members in groups.values():
        assert sorted(ours[n].lora_A.shape[0] for n in members) == sorted(theirs[n].r["default"] for n in members)
    for name, layer in ours.items():
        A, B = layer.lora_A.detach().double(), theirs[name].lora_A["default"].weight.detach().double()
        if A.shape != B.shape:  # a split tie: the shorter is a prefix subspace of the longer
            A, B = (A, B[: A.shape[0]]) if A.shape[0] < B.shape[0] else (A[: B.shape[0]], B)
        cosines = torch.linalg.svdvals(torch.linalg.qr(A.T).Q.T @ torch.linalg.qr(B.T).Q)
        assert float(cosines.min()) > 0.999, name
        assert math.isclose(layer.scaling, theirs[name].scaling["default"])
