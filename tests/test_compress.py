"""Compression maths and invariants (svdkit.compress): equations against direct formulas on small matrices,
parameter budgets, the layer-by-layer path and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import svdkit
from svdkit.compression.allocation import budget, capped_shares, max_saving_rank, tail_energy, threshold_ranks
from svdkit.core.covariance import (cholesky_whitening, eigen_whitening, least_squares_left, uniform_rank,
                                    whitened_truncation)  # fmt: skip
from tests.conftest import calibration_batches, tiny_model

g = torch.Generator().manual_seed(0)


def _data(m=8, n=12, tokens=40):
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return W, X


def _err(W, Wp, X):
    return float(((W - Wp) @ X.T).square().sum())


@pytest.mark.parametrize("whiten", [cholesky_whitening, eigen_whitening])
def test_whitened_truncation_error_is_the_discarded_singular_values(whiten):
    W, X = _data()
    S, S_inv = whiten(X.T @ X)
    assert torch.allclose(S @ S.T, X.T @ X, rtol=1e-9, atol=1e-8)
    for k in (1, 3, 6):
        A, B, sigma, total = whitened_truncation(W, S, S_inv, k)
        assert _err(W, A @ B, X) == pytest.approx(float(sigma[k:].square().sum()), rel=1e-8)  # SVD-LLM's theorem
        U, s, Vh = torch.linalg.svd(W)
        plain = U[:, :k] * s[:k] @ Vh[:k]
        assert _err(W, A @ B, X) <= _err(W, plain, X) * (1 + 1e-12)
        assert total == pytest.approx(float((W @ S).square().sum()))


def test_eigen_whitening_handles_rank_deficient_covariance():
    W, X = _data(tokens=5)  # 5 tokens, 12 features: C has rank 5
    S, S_pinv = eigen_whitening(X.T @ X)
    A, B, sigma, _ = whitened_truncation(W, S, S_pinv, 3)
    assert _err(W, A @ B, X) == pytest.approx(float(sigma[3:].square().sum()), rel=1e-7, abs=1e-9)


def test_cholesky_whitening_damps_a_singular_covariance_with_a_warning():
    _, X = _data(tokens=5)
    with pytest.warns(UserWarning, match="not positive definite"):
        S, S_inv = cholesky_whitening(X.T @ X, "layer.q")
    assert torch.isfinite(S_inv).all() and torch.allclose(S @ S_inv, torch.eye(12, dtype=torch.float64), atol=1e-6)


def test_diagonal_scaling_matches_the_direct_formula():
    W, X = _data()
    s = X.abs().mean(0).sqrt()  # ASVD, alpha = 0.5
    A, B, _, _ = whitened_truncation(W, s, 1 / s, 4)
    U, sig, Vh = torch.linalg.svd(W * s)
    assert torch.allclose(A @ B, (U[:, :4] * sig[:4] @ Vh[:4]) / s, atol=1e-10)


def test_least_squares_update_is_the_lstsq_solution_and_a_noop_on_the_same_inputs():
    W, Xo = _data()
    Xc = Xo + 0.1 * torch.randn(Xo.shape, generator=g, dtype=torch.float64)
    S, S_inv = cholesky_whitening(Xo.T @ Xo)
    A, B, _, _ = whitened_truncation(W, S, S_inv, 4)
    A_new = least_squares_left(W, B, Xo.T @ Xc, Xc.T @ Xc)
    direct = torch.linalg.lstsq(Xc @ B.T, Xo @ W.T).solution.T
    assert torch.allclose(A_new, direct, atol=1e-8)
    assert torch.allclose(least_squares_left(W, B, Xo.T @ Xo, Xo.T @ Xo), A, atol=1e-8)


def test_uniform_rank_and_threshold_allocation():
    assert uniform_rank(100, 300, 0.2) == int(0.8 * 100 * 300 / 400)
    assert max_saving_rank(8, 8) == 3  # 4·16 = 64 saves nothing
    shapes = {f"m{i}": (16, 24) for i in range(4)}
    decay = [torch.tensor([0.5 ** (j * (i + 1) / 4) for j in range(16)]) for i in range(4)]
    ranks = threshold_ranks({n: tail_energy(S) for n, S in zip(shapes, decay)}, shapes, 0.5)
    used = sum(r * 40 if r else 16 * 24 for r in ranks.values())
    assert used <= budget(shapes, 0.5) < used + 40  # within one rank step
    assert ranks["m0"] >= ranks["m3"]  # the slowly decaying spectrum keeps more


def test_capped_shares_water_fill_the_budget():
    # proportional when nothing hits the cap: r = c·s with Σ r·size = target·Σ size
    r = capped_shares([1.0, 2.0, 3.0], [10, 10, 20], 0.3, [0.99] * 3)
    assert r[1] == pytest.approx(2 * r[0]) and r[2] == pytest.approx(3 * r[0])
    assert sum(x * n for x, n in zip(r, [10, 10, 20])) == pytest.approx(0.3 * 40)
    # one dominant score: capped, and its excess re-spent on the others in proportion
    r = capped_shares([100.0, 1.0, 2.0], [10, 10, 10], 0.5, [0.9, 0.99, 0.99])
    assert r[0] == 0.9 and r[2] == pytest.approx(2 * r[1])
    assert sum(r) * 10 == pytest.approx(0.5 * 30)
    assert capped_shares([1.0, 1.0], [5, 5], 0.995, [0.9, 0.8]) == [0.9, 0.8]  # infeasible: everything at the cap
    with pytest.raises(ValueError, match="non-negative score"):
        capped_shares([1.0, -1.0], [1, 1], 0.5, [0.9, 0.9])


def test_svd_llm_v2_ratios_follow_the_loss_and_meet_each_group_budget():
    # a group of four same-type matrices; block 0 loses almost nothing at the uniform rank → capped at rank 1
    shapes = {f"model.layers.{i}.mlp.up_proj": (48, 64) for i in range(4)}
    spectra = {n: torch.tensor([1.0] * 8 + [(1e-6 if i == 0 else 0.2 * (i + 1))] * 40, dtype=torch.float64)
               for i, n in enumerate(shapes)}  # fmt: skip
    ranks = svdkit.config("svd-llm-v2", ratio=0.4, score="relative").allocate(spectra, shapes)
    names = list(shapes)
    assert ranks[names[0]] == 1  # 0.99 would round to rank 0: the cap is rank 1's ratio, 1 − 112/3072
    assert ranks[names[1]] <= ranks[names[2]] <= ranks[names[3]]  # more loss → less compression
    kept = sum(k * 112 for k in ranks.values())
    assert kept <= budget(shapes, 0.4) < kept + 4 * 112  # the group's budget met up to each rank's floor


def test_svd_llm_v2_paper_score_is_one_over_log_loss():
    from svdkit.compression.svd_llm_v2 import scores

    got = scores({"a": 100.0, "b": 10.0, "c": 1.0}, "paper")
    assert got == pytest.approx({"a": 1 / math.log(100), "b": 1 / math.log(10), "c": 1.0})  # L ≤ e → 1
    rel = scores({"a": 3.0, "b": 1.0, "c": 0.0}, "relative")  # mean 4/3
    assert rel["a"] == pytest.approx(1 / math.log1p(9 / 4)) and rel["c"] == pytest.approx(2 / math.log1p(3 / 4))
    shapes = {f"model.layers.{i}.mlp.up_proj": (48, 64) for i in range(3)}
    spectra = {n: torch.tensor([50.0] * 8 + [float(10 ** (i + 1))] * 40, dtype=torch.float64) for i, n in enumerate(shapes)}
    cfg = svdkit.config("svd-llm-v2", ratio=0.3)
    ranks, k = cfg.allocate(spectra, shapes), lambda r: uniform_rank(48, 64, r)
    # equal shapes: R_i = |G|·R·s_i/Σs with L_i = √(Σ_{j>k_R} σ_j²)
    L = [float(spectra[n][k(0.3):].square().sum().sqrt()) for n in shapes]
    s = [1 / math.log(x) for x in L]
    assert list(ranks.values()) == [k(3 * 0.3 * si / sum(s)) for si in s]
    with pytest.raises(ValueError, match="score must be one of"):
        svdkit.config("svd-llm-v2", ratio=0.3, score="log")


@pytest.mark.parametrize("method", ["svd", "svd-llm", "fwsvd"])
def test_uniform_methods_remove_exactly_the_formula(method):
    model = tiny_model("llama")
    targets = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    before = sum(p.numel() for p in model.parameters())
    cfg = svdkit.config(method, ratio=0.3)
    report = svdkit.compress(model, cfg, calibration=calibration_batches() if cfg.uses_calibration else None, progress=False)
    want = {n: uniform_rank(m, n_, 0.3) for n, (m, n_) in targets.items()}
    assert report.ranks() == {n: (k if k <= max_saving_rank(*targets[n]) else None) for n, k in want.items()}
    after = sum(p.numel() for p in model.parameters())
    assert before - after == report.params_before - report.params_after
    assert report.params_after == sum(r.rank * sum(r.shape) if r.rank else r.shape[0] * r.shape[1] for r in report.rows)


@pytest.mark.parametrize("method", ["asvd", "welore", "svd-llm-v2"])
def test_allocated_methods_meet_the_budget_within_one_rank_step(method):
    model = tiny_model("llama")
    cfg = svdkit.config(method, ratio=0.4)
    report = svdkit.compress(model, cfg, calibration=calibration_batches() if cfg.uses_calibration else None, progress=False)
    steps = sum(sum(r.shape) for r in report.rows)
    assert abs(report.params_after - (1 - 0.4) * report.params_before) <= steps
    assert report.params_after <= (1 - 0.4) * report.params_before


def test_layer_by_layer_equals_precomputed_statistics_and_holds_one_block():
    batches = calibration_batches()
    ids = batches[0]["input_ids"]
    a, b = tiny_model("llama"), tiny_model("llama")
    cfg = svdkit.config("svd-llm", ratio=0.3)
    stats = svdkit.calibrate(b, batches, cfg, progress=False)
    ra = svdkit.compress(a, cfg, calibration=batches, progress=False)
    rb = svdkit.compress(b, cfg, calibration=stats, progress=False)
    assert ra.mode == "layer by layer" and rb.mode == "precomputed statistics"
    with torch.no_grad():
        assert torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-4)
    # one block's distinct-input covariances (qkv, o, gate/up, down) — half of the two blocks' together
    assert ra.statistics_peak_bytes < rb.statistics_peak_bytes
    assert ra.statistics_total_bytes == 2 * ra.statistics_peak_bytes  # two blocks
    assert ra.statistics_total_bytes == pytest.approx(rb.statistics_total_bytes, rel=1e-2)  # (counters differ)
    assert ra.statistics_peak_bytes == (3 * 32 * 32 + 64 * 64) * 8 + 4 * 2 * 8  # + per-statistic counters
    for ea, eb in zip(ra.rows, rb.rows):
        assert ea.calibration_error == pytest.approx(eb.calibration_error, rel=1e-4)
        assert ea.calibration_error == pytest.approx(1 - ea.kept_energy, rel=1e-6, abs=1e-9)  # the theorem, per module


def test_update_and_whitening_beat_plain_svd_on_the_calibration_outputs():
    batches = calibration_batches()
    ids = torch.cat([b["input_ids"] for b in batches])
    ref = tiny_model("llama")
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    errors = {}
    for name, opts in (("svd", {}), ("svd-llm", {}), ("svd-llm", {"update": True})):
        model = tiny_model("llama")
        cfg = svdkit.config(name, ratio=0.3, **opts)
        svdkit.compress(model, cfg, calibration=batches if cfg.uses_calibration else None, progress=False)
        with torch.no_grad():
            errors[(name, bool(opts))] = float((model(input_ids=ids).logits - want).square().mean())
    assert errors[("svd-llm", False)] < errors[("svd", False)]
    assert errors[("svd-llm", True)] < errors[("svd-llm", False)] * 1.05


def test_randomized_svd_is_reproducible():
    outs = []
    for _ in range(2):
        model = tiny_model("llama")
        svdkit.compress(model, svdkit.config("svd", ratio=0.5, svd="randomized", seed=3))
        outs.append(model.model.layers[0].mlp.down_proj.first.weight.clone())
    assert torch.equal(outs[0], outs[1])


def test_gradient_and_activation_statistics_match_direct_computation():
    model = tiny_model("llama")
    batch = calibration_batches(1)[0]
    stats = svdkit.calibrate(model, [batch], svdkit.config("fwsvd"), progress=False)
    model.zero_grad()
    model(**batch).loss.backward()
    g2 = model.model.layers[1].mlp.down_proj.weight.grad.double().square().sum(0)
    assert torch.allclose(stats["model.layers.1.mlp.down_proj"]["fisher"], g2, rtol=1e-4)
    x = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: x.append(a[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    mask = batch["attention_mask"].bool()
    direct = torch.stack([x[0][i][mask[i]].abs().mean(0) for i in range(2)]).mean(0).double()
    stats = svdkit.calibrate(model, [batch], svdkit.config("asvd"), progress=False)
    assert torch.allclose(stats["model.layers.0.mlp.down_proj"]["abs_mean"], direct, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_other_architectures_compress(arch):
    model = tiny_model(arch)
    report = svdkit.compress(model, svdkit.config("svd-llm", ratio=0.3), calibration=calibration_batches(), progress=False)
    assert report.rows and all(r.calibration_error is None or r.calibration_error < 1 for r in report.rows)
    with torch.no_grad():
        out = model(input_ids=calibration_batches(1)[0]["input_ids"])
    assert torch.isfinite(out[0]).all()


def test_bad_input_is_refused_before_anything_changes():
    for ratio in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            svdkit.config("svd-llm", ratio=ratio)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="data-aware"):
        svdkit.compress(model, svdkit.config("svd-llm"))
    with pytest.raises(ValueError, match="data-free"):
        svdkit.compress(model, svdkit.config("svd"), calibration=calibration_batches())
    with pytest.raises(ValueError, match="matched no linear"):
        svdkit.compress(model, svdkit.config("svd", targets="rotary_emb"))
    with pytest.raises(ValueError, match="update=True"):
        stats = svdkit.calibrate(model, calibration_batches(), svdkit.config("svd-llm"), progress=False)
        svdkit.compress(model, svdkit.config("svd-llm", update=True), calibration=stats)
    with pytest.raises(TypeError, match="compression config"):
        svdkit.compress(model, svdkit.config("pissa"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_short_calibration_warns_and_still_compresses():
    model = tiny_model("llama")
    short = [{"input_ids": torch.randint(0, 128, (1, 6), generator=g), "attention_mask": torch.ones(1, 6, dtype=torch.long)}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svdkit.compress(model, svdkit.config("svd-llm", ratio=0.3), calibration=short, progress=False)
    assert any("damped" in str(w.message) or "rank-deficient" in str(w.message) for w in caught)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=short[0]["input_ids"]).logits).all()


def test_compress_configs_are_registered_and_round_trip_through_json():
    import json

    assert svdkit.methods("compress") == ["asvd", "clover-prune", "fwsvd", "svd", "svd-llm", "svd-llm-v2", "welore"]
    for name in svdkit.methods("compress"):
        cfg = svdkit.config(name, ratio=0.35, targets=["q_proj", "v_proj"])
        assert svdkit.config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert cfg.kind == "compress" and cfg.paper.startswith("https://") and cfg.summary
