"""`svdkit bench` on a tiny model (in-process, offline accuracy questions), its pieces (the arithmetic
generator, BIG-bench exact match, the report, the matched budget, the claims), the diagnostics and the
full fine-tuning preset. Nothing here downloads BIG-bench or touches the real default model."""

from __future__ import annotations

import math
import re

import pytest
import torch

import svdkit
from svdkit.benchmarking import arithmetic, bigbench, claims, grid, report
from svdkit.benchmarking import results as results_mod
from svdkit.inspection.diagnostics import effective_rank, intruder_dimensions


# -- diagnostics -----------------------------------------------------------------------------------
def _householder_with_first_column(u: torch.Tensor) -> torch.Tensor:
    """An orthogonal matrix whose first column is the unit vector u (H e1 = u)."""
    e1 = torch.zeros_like(u)
    e1[0] = 1
    w = e1 - u
    return torch.eye(len(u), dtype=u.dtype) - 2 * torch.outer(w, w) / (w @ w)


def test_intruder_dimensions_on_hand_made_matrices():
    W0 = torch.diag(torch.tensor([6.0, 5, 4, 3, 2, 1], dtype=torch.float64))  # left singular vectors: e_i
    u = torch.ones(6, dtype=torch.float64) / math.sqrt(6)  # |cos| with every e_i = 1/√6 ≈ 0.408
    Q = _householder_with_first_column(u)
    assert torch.allclose(Q[:, 0], u) and torch.allclose(Q.T @ Q, torch.eye(6, dtype=torch.float64))
    W1 = Q @ torch.diag(torch.tensor([10.0, 5, 4, 3, 2, 1], dtype=torch.float64))  # top direction: u
    assert intruder_dimensions(W0, W1, k=1, eps=0.5) == 1
    assert intruder_dimensions(W0, W1, k=1, eps=0.4) == 0  # 0.408 ≥ 0.4: not an intruder
    assert intruder_dimensions(W0, W0.clone(), k=6) == 0
    permuted = W0[[2, 0, 1, 5, 3, 4]] * torch.tensor([1.0, -1, 1, 1, -1, 1], dtype=torch.float64)[:, None]
    assert intruder_dimensions(W0, permuted, k=6) == 0  # same directions, reordered and sign-flipped
    with pytest.raises(ValueError, match="same shape"):
        intruder_dimensions(W0, W0[:5])
    with pytest.raises(ValueError, match="k must be"):
        intruder_dimensions(W0, W1, k=7)


def test_effective_rank_matches_the_entropy_formula():
    assert effective_rank(torch.ones(4)) == pytest.approx(4.0)
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = [0.75, 0.25]
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="zero matrix"):
        effective_rank(torch.zeros(3))


# -- full fine-tuning preset -----------------------------------------------------------------------
def test_full_trains_every_weight_entry_with_the_full_weight_gradient():
    torch.manual_seed(0)
    base = torch.nn.Linear(9, 12)
    plain = torch.nn.Linear(9, 12)
    plain.load_state_dict(base.state_dict())
    model = torch.nn.Sequential(base)
    svdkit.adapt(model, svdkit.config("full"), progress=False)
    layer = model[0]
    assert sum(p.numel() for _, p in layer.adapter_parameters()) == 12 * 9
    x = torch.randn(5, 9)
    torch.testing.assert_close(model(x), plain(x))  # the base function at init
    model(x).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    torch.testing.assert_close(layer.core.value.grad, plain.weight.grad)  # ∂L/∂C = ∂L/∂W
    with torch.no_grad():
        layer.core.value.add_(0.1)
    torch.testing.assert_close(layer.merged_weight(), plain.weight + 0.1)
    with pytest.raises(ValueError):
        svdkit.export_peft(model, "/nonexistent/peft")


# -- data and scoring ------------------------------------------------------------------------------
def test_arithmetic_generator_is_deterministic_and_correct():
    a, b = arithmetic.generate(300, seed=5), arithmetic.generate(300, seed=5)
    assert a == b and a != arithmetic.generate(300, seed=6)
    assert len({p["question"] for p in a}) == 300
    ops = {"plus": lambda x, y: x + y, "minus": lambda x, y: x - y, "times": lambda x, y: x * y,
           "divided": lambda x, y: x / y}  # fmt: skip
    for p in a:
        assert p["answer"] == ops[p["op"]](p["a"], p["b"]) and p["answer"] >= 0
        assert sorted(int(x) for x in re.findall(r"\d+", p["question"])) == sorted([p["a"], p["b"]])
    assert {p["op"] for p in a} == set(ops)


def test_examples_label_the_answer_only(tiny_run_inputs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_run_inputs[0]))
    item = arithmetic.example(tok, "What is 3 plus 4?", "7")
    labelled = [t for t in item["labels"] if t != -100]
    assert tok.decode(labelled) == " 7" + tok.eos_token
    assert tok.decode(item["input_ids"][: len(item["input_ids"]) - len(labelled)]).endswith("Q: What is 3 plus 4?\nA:")


def test_exact_match_is_bigbench_first_regex_match():
    assert bigbench.exact_match(" 19\nQ: next", "19")
    assert bigbench.exact_match("The answer is 19.", "19")
    assert bigbench.exact_match("-3 apples", "-3")
    assert not bigbench.exact_match("190", "19")
    assert not bigbench.exact_match("19 20", "20")  # only the first number counts
    assert not bigbench.exact_match("nineteen", "19")


def test_bigbench_sample_is_seeded_and_per_task():
    tasks = {"t1": [{"input": f"q{i}", "target": str(i)} for i in range(10)], "t2": [{"input": "x", "target": "1"}]}
    s = bigbench.sample(tasks, 3, seed=1)
    assert s == bigbench.sample(tasks, 3, seed=1) and len(s) == 4
    assert [x["task"] for x in s].count("t1") == 3 and all(x["target"] == x["question"][1:] for x in s if x["task"] == "t1")


# -- the plan ---------------------------------------------------------------------------------------
def test_matched_budget_probes_the_trainable_count():
    bench = grid.BenchConfig(rank=8, svd="exact")
    options, note = grid.matched_options("pissa", bench, (64, 64))
    assert options["rank"] == 8 and "1024" in note
    options, _ = grid.matched_options("spectral-r", bench, (64, 64))  # r(r − 1) trainable
    assert abs(options["rank"] * (options["rank"] - 1) - 1024) == min(abs(r * (r - 1) - 1024) for r in range(1, 64))
    options, note = grid.matched_options("svfit", bench, (64, 64))  # r ≤ 63 can never reach 1024
    assert "rank" not in options and "paper default" in note
    assert "rank" not in grid.matched_options("full", bench, (64, 64))[0]


def test_budget_probe_scales_adalora_target_r_and_keeps_error_text_out():
    """Issue 11 item 7: the probe ran AdaLoRA at target_r 8 > rank 5, failed, and wrote the error into the table."""
    bench = grid.BenchConfig(rank=8, svd="exact")
    options, note = grid.matched_options("adalora", bench, (64, 64))
    r = options["rank"]
    assert options["target_r"] == max(1, round(r * 8 / 12)) and abs(r * (64 + 64 + 1) - 1024) <= 129
    assert "Error" not in note and "must be" not in note and "probe failed" not in note
    assert grid.rank_options("pissa", 5) == {"rank": 5}


def test_lr_grid_is_a_log_grid_centred_on_the_paper_lr():
    lrs = grid.BenchConfig(lr_points=5, lr_ratio=2.0).lr_grid(1e-4)
    assert lrs == [2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4]
    with pytest.raises(ValueError, match="at least 3"):
        grid.BenchConfig(lr_points=2)


# -- the report ------------------------------------------------------------------------------------
def _result(label, lr, seed, val, test=None, params=100, acc=0.25, n=64, method=None, **extra):
    cell = grid.cell(method or label, {}, lr, seed, label)
    return {"cell": cell, "val_loss": val, "test_loss": val if test is None else test, "best_step": 10,
            "curve": [(5, val + 0.1), (10, val)], "params": params, "init_s": 0.5, "step_s_median": 0.2,
            "peak_mib": 10.0, "accuracy": {"accuracy": acc, "n": n}, **extra}  # fmt: skip


def test_wilson_interval_is_the_score_interval():
    lo, hi = results_mod.wilson(8, 64)
    p, z, n = 8 / 64, 1.959964, 64
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert 0.06 < lo < 0.07 and 0.22 < hi < 0.24  # 12.5 % of 64: about [6, 23] %
    assert results_mod.wilson(0, 64)[0] == 0.0 and results_mod.wilson(0, 0) == (0.0, 1.0)


def _plan_of(rows, names, lrs=(1e-4, 3e-4, 1e-3)):
    info = {n: {"options": {}, "budget": f"b-{n}", "lrs": list(lrs)} for n in names}
    return {"methods": info, "cells": [r["cell"] for r in rows]}, {r["cell"]["id"]: r for r in rows}


def test_report_selects_on_validation_reports_test_and_declares_the_winner_by_accuracy():
    rows = [_result("base", 0.0, 0, 3.0, acc=0.14),
            _result("lora", 1e-4, 0, 2.0, acc=0.2), _result("lora", 3e-4, 0, 1.8, 1.9, acc=0.3), _result("lora", 1e-3, 0, 1.9),
            _result("pissa", 1e-4, 0, 1.7, 1.75, acc=0.25), _result("pissa", 3e-4, 0, 1.75, acc=0.5),
            _result("nlora", 3e-4, 0, 1.0, 3.5, acc=0.9),  # lowest validation loss, test loss above the base's
            _result("full", 1e-4, 0, 1.5, params=9999, acc=0.9),
            _result("clip-svd", 3e-4, 0, 2.5), _result("vectorfit", 3e-4, 0, 2.501),  # declared pair: within 1 %
            _result("soma", 3e-4, 0, 2.6), _result("milora", 3e-4, 0, 2.601),  # undeclared: exact equality only
            _result("lora", 3e-4, 1, 1.85, 1.95, acc=0.28)]  # fmt: skip
    plan, results = _plan_of(rows, ("lora", "pissa", "nlora", "full", "clip-svd", "vectorfit", "soma", "milora"))
    s = report.summarize(plan, results)
    assert s["best"]["pissa"]["lr"] == 1e-4  # chosen on validation loss (1.70), not on accuracy
    assert s["winner"] == "lora"  # pissa's chosen run: 25 % < lora's 30 %; nlora is worse than the base; full: reference
    assert s["runner_up"] == "pissa" and s["separated"] is False  # 64 questions: 25 % lies inside lora's interval
    assert s["identical"] == [("clip-svd", "vectorfit")]
    assert s["spreads"]["lora"]["seeds"] == 2 and s["spreads"]["lora"]["test_loss"] == pytest.approx(math.sqrt(0.00125))
    errors = {"eva/lr5.00e-04/s0": {"error": "RuntimeError: out of memory", "cell": {}}}
    results["x"] = {**_result("svft", 1e-4, 0, 1.0), "skipped": "Refused: svd_rank too large"}
    text = report.markdown(grid.BenchConfig(), plan, results, s, errors)
    assert "| lora **(winner)** | b-lora | 0.0003 | 1.800 (step 10) | 1.900 | 30.0 [20, 42] |" in text
    assert "| pissa | b-pissa | 0.0001↓ |" in text  # the smallest LR of its sweep
    assert "chosen on a validation split" in text and "separate test split" in text and "held-apart" in text
    assert "VectorFit = CLIP-SVD here" in text and "does not separate them" in text
    assert "## Refused configurations" in text and "svd_rank too large" in text
    assert "## Failed runs" in text and "RuntimeError: out of memory" in text


def test_lr_sweep_extends_past_the_edge_until_interior_or_capped():
    bench = grid.BenchConfig(lr_ratio=2.0, lr_extend=2)
    rows = [_result("lora", lr, 0, v) for lr, v in ((1e-4, 2.0), (2e-4, 1.9), (4e-4, 1.8))]
    plan, results = _plan_of(rows, ("lora",), (1e-4, 2e-4, 4e-4))
    extra = grid.extension_cells(bench, results, plan["methods"])
    assert [c["lr"] for c in extra] == [8e-4]  # one more point past the upper edge
    results.update({r["cell"]["id"]: r for r in [_result("lora", 8e-4, 0, 1.7)]})
    assert [c["lr"] for c in grid.extension_cells(bench, results, plan["methods"])] == [1.6e-3]
    results.update({r["cell"]["id"]: r for r in [_result("lora", 1.6e-3, 0, 1.6)]})
    assert grid.extension_cells(bench, results, plan["methods"]) == []  # lr_extend points added: capped
    best = results_mod.best_by_method(results, plan["methods"])
    assert results_mod.capped(bench.lr_extend, best, plan["methods"]) == {"lora"}
    results.update({r["cell"]["id"]: r for r in [_result("lora", 3.2e-3, 0, 5.0)]})  # interior now: not capped
    best = results_mod.best_by_method(results, plan["methods"])
    assert results_mod.capped(bench.lr_extend, best, plan["methods"]) == set() and not results_mod.edge(best["lora"])


def test_failures_are_error_records_retried_on_resume_and_only_refusals_are_skips(tmp_path, monkeypatch):
    from svdkit.benchmarking import cell as cell_mod
    from svdkit.core.registry import Refused

    cells = [grid.cell("lora", {}, 1e-4, 0), grid.cell("svft", {}, 1e-4, 0)]

    def failing(bench, out, c, cache):
        raise (Refused("SVFT: svd_rank too large") if c["method"] == "svft" else RuntimeError("boom"))

    monkeypatch.setattr(cell_mod, "run_cell", failing)
    cell_mod.run_spec({"bench": {}, "out": str(tmp_path), "cells": cells})
    lora, svft = (tmp_path / "cells" / c["id"] for c in cells)
    assert not (lora / "result.json").exists() and "RuntimeError: boom" in (lora / "error.json").read_text()
    assert "Refused" in (svft / "result.json").read_text() and not (svft / "error.json").exists()
    assert list(grid.load_errors(tmp_path)) == [cells[0]["id"]]
    monkeypatch.setattr(cell_mod, "run_cell", lambda bench, out, c, cache: {"val_loss": 1.0})
    cell_mod.run_spec({"bench": {}, "out": str(tmp_path), "cells": cells})  # resume: the failure runs again
    assert (lora / "result.json").exists() and not (lora / "error.json").exists() and not grid.load_errors(tmp_path)


def test_claim_rule_on_paired_seed_values():
    assert claims.decide([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], "lower")[0] == "holds"  # d = 1 ± 0
    assert claims.decide([2.0, 2.1, 1.9], [1.0, 1.1, 0.9], "lower")[0] == "does not hold"
    assert claims.decide([1.0, 1.5, 0.6], [1.1, 1.0, 1.2], "lower")[0] == "inconclusive"  # inside 2 sd
    assert claims.decide([5, 6, 7], [1, 1, 2], "higher")[0] == "holds"
    assert claims.decide([1.01, 1.02, 1.0], [1.0, 1.0, 1.0], "comparable", ratio=0.01)[0] == "holds"
    assert claims.decide([1.01, 1.02, 1.0], [1.0, 1.0, 1.0], "comparable", ratio=0.5)[0] == "does not hold"
    assert claims.decide([1.5, 1.6, 1.4], [1.0, 1.0, 1.0], "comparable", ratio=0.01)[0] == "does not hold"
    with pytest.raises(ValueError, match="claim_seeds must be at least 3"):
        grid.BenchConfig(claim_seeds=2)


def test_claims_plan_uses_the_papers_configurations():
    bench = grid.BenchConfig.claims_suite()
    assert (bench.steps, bench.claim_seeds) == (40, 3)
    p = claims.plan(bench, (576, 576), 192)
    assert len(p["claims"]) == len(claims.CLAIMS)
    assert p["arms"]["svfit-0.99"][:2] == ("svfit", {"rank": 191, "energy": 0.99})
    assert p["arms"]["svft"][1] == {} and svdkit.SVFT().init == "kaiming"
    assert p["arms"]["pissa"][2] == p["arms"]["lora@pissa-lr"][2] == svdkit.PiSSA.lr
    assert sum(c["label"] == "eva-uniform" for c in p["cells"]) == 3
    only = claims.plan(grid.BenchConfig.claims_suite(methods=("lora", "pissa")), (64, 64))
    assert only["claims"] == ["pissa-faster"]


def test_bench_cell_trains_a_two_split_method_on_both_splits(monkeypatch):
    """BiLoRA in the bench: P, Q steps on D₁ batches and λ steps on D₂ batches, as svdkit finetune trains it."""
    from conftest import tiny_model
    from svdkit.benchmarking import cell as cell_mod

    model = tiny_model("llama")
    cfg = svdkit.config("bilora", rank=2, inner_steps=2, split_fraction=0.25)
    svdkit.adapt(model, cfg)
    seen = []

    def step(net, ddp, batches, loop, split, **kw):
        seen.append((split, batches[0]))
        loop.step += 1
        return {"loss": 1.0}

    monkeypatch.setattr(cell_mod, "collate", lambda items, pad: tuple(i["input_ids"][0] for i in items))
    monkeypatch.setattr(cell_mod, "train_step", step)
    monkeypatch.setattr(cell_mod, "eval_loss", lambda *a: (1.0, math.e))
    items = [{"input_ids": [i]} for i in range(40)]
    out = cell_mod._train({"steps": 6, "batch_size": 2, "eval_every": 3}, {"lr": 1e-3, "seed": 0}, model,
                          {"train": items, "val": []}, 0, cfg)  # fmt: skip
    assert [s for s, _ in seen] == [1, 1, 2, 1, 1, 2]  # split_at: two inner steps, then one outer step
    d1, d2 = [set().union(*(set(b) for s, b in seen if s == k)) for k in (1, 2)]
    assert d1 and d2 and not d1 & d2  # disjoint shares of the training split
    assert out["val_loss"] == 1.0


# -- the whole bench, tiny -------------------------------------------------------------------------
def _tiny_bench(model, out, **kw):
    options = dict(model=str(model), methods=["lora", "pissa"], rank=2, steps=2, eval_every=1, accuracy="generated",
                   per_task=1, train_problems=32, heldout_problems=4, test_problems=4, calibration_samples=4,
                   lee_blocks=1, top=1, intruder_layers=2, max_new_tokens=3, lr_extend=1)  # fmt: skip
    return svdkit.bench(out, progress=False, log=lambda *_: None, processes=False, **{**options, **kw})


def _mtimes(out):
    return {p.parent.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / "cells").rglob("result.json")}


def test_bench_runs_reports_and_resumes(tiny_run_inputs, tmp_path):
    out = tmp_path / "bench"
    summary = _tiny_bench(tiny_run_inputs[0], out)
    results = grid.load_results(out)
    grid_lrs = {"lora": [6.32e-05, 2e-04, 6.32e-04], "pissa": [6.32e-06, 2e-05, 6.32e-05]}
    for name, lrs in grid_lrs.items():
        swept = sorted(r["cell"]["lr"] for r in results.values() if r["cell"]["label"] == name and r["cell"]["seed"] == 0)
        assert set(lrs) <= set(swept) and len(swept) <= len(lrs) + 1  # at most lr_extend = 1 point added
    model, _ = svdkit.load_model(str(tiny_run_inputs[0]))
    budget = sum(2 * sum(m.weight.shape) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"))  # fmt: skip
    for r in results.values():
        assert "skipped" not in r, r
        if r["cell"]["method"] in ("lora", "pissa"):
            assert r["params"] == budget and len(r["curve"]) == 2 and 0 <= r["accuracy"]["accuracy"] <= 1
            assert r["val_loss"] == min(v for _, v in r["curve"]) and r["best_step"] in (1, 2)
            assert math.isfinite(r["test_loss"])
    assert any(r["cell"]["seed"] == 1 for r in results.values())  # the noise seed
    for name in ("lora", "pissa"):  # an LR sweep starts every cell from the first cell's init (saved, reloaded)
        assert len({r["init_s"] for r in results.values() if r["cell"]["label"] == name and r["cell"]["seed"] == 0}) == 1
    assert {p.name.split("-")[0] for p in (out / "inits").iterdir() if p.is_dir()} == {"lora", "pissa"}
    text = (out / "report.md").read_text()
    assert summary["winner"] in ("lora", "pissa") and f"**{summary['winner']}**" in text
    assert "| lora" in text and "| pissa" in text and "LR sweeps" in text and "zero-shot accuracy" in text
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    before = _mtimes(out)
    _tiny_bench(tiny_run_inputs[0], out)  # resume: nothing recomputed
    assert _mtimes(out) == before
    (out / "cells" / "pissa/lr2.00e-05/s0" / "result.json").unlink()
    _tiny_bench(tiny_run_inputs[0], out)  # only the missing cell runs again
    after = _mtimes(out)
    assert {k for k in after if after[k] != before.get(k)} == {"cells/pissa/lr2.00e-05/s0"}
    with pytest.raises(ValueError, match="different settings"):
        _tiny_bench(tiny_run_inputs[0], out, steps=3)


def test_bench_claims_runs_end_to_end(tiny_run_inputs, tmp_path):
    out = tmp_path / "claims"
    summary = _tiny_bench(tiny_run_inputs[0], out, claims=True, steps=2, eval_every=1)  # lora + pissa: one claim
    (claim,) = summary["claims"]
    assert claim["id"] == "pissa-faster" and summary["seeds"] == [0, 1, 2] and summary["steps"] == 2
    assert claim["verdict"] in ("holds", "does not hold", "inconclusive")
    assert len(claim["better_values"]) == len(claim["other_values"]) == len(claim["diff"]) == 3
    assert claim["config"]["pissa"]["lr"] == claim["config"]["lora@pissa-lr"]["lr"] == svdkit.PiSSA.lr
    results = grid.load_results(out)
    assert sorted(r["cell"]["seed"] for r in results.values() if r["cell"]["label"] == "pissa") == [0, 1, 2]
    text = (out / "report.md").read_text()
    assert "3 seeds" in text and "Rule:" in text and " ± " in text and "PiSSA converges faster" in text


def test_cli_bench_help(capsys):
    from svdkit.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--quick" in text and "--methods" in text and "--fresh" in text


def test_intruder_summary_spreads_over_module_types():
    from conftest import perturb_adapters, tiny_model
    from svdkit.benchmarking.diagnose import intruder_summary

    model = tiny_model("llama")
    svdkit.adapt(model, svdkit.config("lora", rank=4), progress=False)
    perturb_adapters(model, scale=0.5)
    summary = intruder_summary(model, max_layers=7, k=4)
    names = list(summary["per_layer"])
    assert len(names) == 7 and len({n.rsplit(".", 1)[-1] for n in names}) == 7  # q, k, v, o, gate, up, down
    layers = dict(svdkit.adapters.api.adapted_layers(model))
    direct = [intruder_dimensions(layers[n].original_weight(), layers[n].merged_weight(), k=4) for n in names]
    assert summary["per_layer"] == dict(zip(names, direct)) and summary["total"] == sum(direct)
