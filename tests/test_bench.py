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


def test_lr_grid_is_a_log_grid_centred_on_the_paper_lr():
    lrs = grid.BenchConfig(lr_points=5, lr_ratio=2.0).lr_grid(1e-4)
    assert lrs == [2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4]
    with pytest.raises(ValueError, match="at least 3"):
        grid.BenchConfig(lr_points=2)


# -- the report ------------------------------------------------------------------------------------
def _result(label, lr, seed, loss, params=100, **extra):
    cell = grid.cell(label, {}, lr, seed)
    return {"cell": cell, "best_heldout": loss, "curve": [(5, loss + 0.1), (10, loss)], "params": params, "init_s": 0.5,
            "step_s_median": 0.2, "peak_mib": 10.0, "accuracy": {"accuracy": 0.25}, **extra}  # fmt: skip


def test_report_marks_the_winner_its_margin_and_the_noise():
    info = {n: {"options": {}, "budget": f"b-{n}", "lrs": [1e-4, 3e-4, 1e-3]} for n in ("lora", "pissa", "full")}
    rows = [_result("lora", 1e-4, 0, 2.0), _result("lora", 3e-4, 0, 1.8), _result("lora", 1e-3, 0, 1.9),
            _result("pissa", 1e-4, 0, 1.7), _result("pissa", 3e-4, 0, 1.75), _result("full", 1e-4, 0, 1.5, 9999),
            _result("pissa", 1e-4, 1, 1.74), _result("lora", 3e-4, 1, 1.81)]  # fmt: skip
    results = {r["cell"]["id"]: r for r in rows}
    plan = {"methods": info, "cells": [r["cell"] for r in rows]}
    s = report.summarize(plan, results)
    assert s["winner"] == "pissa"  # full FT is the reference, not a contender
    assert s["margin"] == pytest.approx(0.1) and s["noise"] == pytest.approx(0.04) and s["exceeds_noise"]
    text = report.markdown(grid.BenchConfig(), plan, results, s)
    assert "| pissa **(winner)** | b-pissa | 0.0001↓ | 1.700 | 25.0 | 100 |" in text  # the sweep's smallest LR
    assert "| lora | b-lora | 0.0003 | 1.800 |" in text  # inside its sweep: no edge mark
    assert "| full (reference) |" in text and "3e-4: 1.800 ←" not in text and "0.0003: 1.800 ←" in text
    assert "margin over LoRA +0.1000 nats, which exceeds the seed-to-seed noise 0.0400" in text


def test_claim_verdicts_read_the_results():
    info = {n: {"options": {"rank": 4}, "budget": "", "lrs": [1e-4, 2e-4, 4e-4]} for n in ("lora", "pissa", "full")}
    cells = claims.extra_cells(grid.BenchConfig(), info, [grid.cell(n, {"rank": 4}, lr, 0) for n in info for lr in info[n]["lrs"]])
    assert any(c["label"] == "pissa-at-lora-lr" and c["lr"] == 2e-4 for c in cells)
    assert [c["measure"] for c in cells if c["label"] == "lora" and c["lr"] == 2e-4] == [["intruders"]]
    results = {}
    for c in cells:
        r = _result(c["label"], c["lr"], 0, 1.0, intruders={"layers": 3, "total": 4 if c["label"] == "lora" else 1})
        if c["label"] == "pissa-at-lora-lr":
            r["curve"] = [(5, 0.5), (10, 0.4)]
        results[c["id"]] = r
    verdicts = {v["claim"]: v["verdict"] for v in claims.verdicts({"methods": info, "cells": cells}, results, 0.01)}
    assert verdicts["PiSSA converges faster than LoRA (same rank and LR)"] == "holds"
    assert verdicts["LoRA creates more intruder dimensions than full fine-tuning"] == "holds"
    assert verdicts["EVA's rank redistribution beats uniform ranks (same budget)"] == "not run"


# -- the whole bench, tiny -------------------------------------------------------------------------
def _tiny_bench(model, out, **kw):
    options = dict(model=str(model), methods=["lora", "pissa"], rank=2, steps=2, eval_every=1, accuracy="generated",
                   per_task=1, train_problems=32, heldout_problems=4, lee_blocks=1, top=1, intruder_layers=2,
                   max_new_tokens=3)  # fmt: skip
    return svdkit.bench(out, progress=False, log=lambda *_: None, processes=False, **{**options, **kw})


def _mtimes(out):
    return {p.parent.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / "cells").rglob("result.json")}


def test_bench_runs_reports_and_resumes(tiny_run_inputs, tmp_path):
    out = tmp_path / "bench"
    summary = _tiny_bench(tiny_run_inputs[0], out)
    results = grid.load_results(out)
    lrs = {c: sorted(r["cell"]["lr"] for r in results.values() if r["cell"]["label"] == c and r["cell"]["seed"] == 0)
           for c in ("lora", "pissa")}
    assert lrs == {"lora": [6.32e-05, 2e-04, 6.32e-04], "pissa": [6.32e-06, 2e-05, 6.32e-05]}
    model, _ = svdkit.load_model(str(tiny_run_inputs[0]))
    budget = sum(2 * sum(m.weight.shape) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"))  # fmt: skip
    for r in results.values():
        assert "skipped" not in r, r
        if r["cell"]["method"] in ("lora", "pissa"):
            assert r["params"] == budget and len(r["curve"]) == 2 and 0 <= r["accuracy"]["accuracy"] <= 1
    assert "intruders" in results["lora/lr2.00e-04/s0"] and "lee_perplexity" in results["pissa/lr2.00e-05/s0"]
    assert any(r["cell"]["seed"] == 1 for r in results.values())  # the noise seed
    for name in ("lora", "pissa"):  # an LR sweep starts every cell from the first cell's init (saved, reloaded)
        assert len({r["init_s"] for r in results.values() if r["cell"]["label"] == name and r["cell"]["seed"] == 0}) == 1
    assert {p.name.split("-")[0] for p in (out / "inits").iterdir()} == {"lora", "pissa"}
    text = (out / "report.md").read_text()
    assert summary["winner"] in ("lora", "pissa") and f"**{summary['winner']}**" in text
    assert "| lora" in text and "| pissa" in text and "Best LR per method" in text and "zero-shot accuracy" in text
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
