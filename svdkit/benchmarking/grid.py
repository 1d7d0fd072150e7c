"""`svdkit bench`: the plan (methods × LR grid × seeds, plus claim variants) and its resumable runner.

Each method runs at a matched trainable-parameter budget where it allows one (the rank whose trainable
count on the model's most common target shape is nearest LoRA's r(m+n) at the bench rank, probed on a
seeded random matrix of that shape; data-aware methods take LoRA's rank; full-spectrum methods and
methods whose count cannot come within 50% of the budget keep their paper defaults), with an LR sweep
of ``lr_points`` values on a log grid of ratio ``lr_ratio`` centred on the method's ``lr`` ClassVar,
the same data order, seeds and step budget. Where the LR chosen on the validation split sits at an edge of
its sweep, the sweep is extended one point past that edge at a time, up to ``lr_extend`` points per side
(rows still at an edge then are marked "capped"). Cells run method by method in fresh processes
(``svdkit.benchmarking.cell``); a cell with a ``result.json`` is never recomputed, a failed one (its
``error.json``) is retried. After the grid, the ``top`` methods by the winner metric (test accuracy among the
methods whose test loss beats the base model's; see report.py) and LoRA run again with ``noise_seeds - 1``
more seeds at their chosen LR: the seed-to-seed noise. ``claims=True`` runs the papers' claims instead
(claims.py): each at its paper configuration, ``claim_seeds`` seeds, ``steps`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from svdkit.core.registry import Refused, config, method_class, methods
from svdkit.core.files import mark, remove_output, write_text
from svdkit.benchmarking import bigbench, claims
from svdkit.benchmarking.results import best_by_method, beyond, cell
from svdkit.benchmarking.cell import ERROR, RESULT

QUICK_METHODS = ("lora", "pissa", "svfit", "full")


@dataclass(frozen=True)
class BenchConfig:
    """What a bench compares and how (the defaults are the full grid; :meth:`quick` the 5-minute one)."""

    model: str = "default"
    methods: tuple[str, ...] | None = None  # None: every registered method
    rank: int = 8  # LoRA's rank: the trainable budget the other methods match
    svd: str = "randomized"  # the truncated-SVD methods' init (exact for full-spectrum methods anyway)
    steps: int = 10
    batch_size: int = 4
    eval_every: int = 5
    lr_points: int = 3
    lr_ratio: float = math.sqrt(10)
    lr_extend: int = 3  # at most this many LR points added past each edge of the sweep
    seed: int = 0
    noise_seeds: int = 2  # seeds run by the top methods (and LoRA) at their best LR
    top: int = 3
    data_seed: int = 0
    train_problems: int = 2000
    heldout_problems: int = 32  # the validation split: chooses the LR and the checkpoint
    test_problems: int = 32  # the test split: the reported loss
    accuracy: str = "bigbench"  # "bigbench" (downloads the sdist once) or "generated" (offline / tests)
    per_task: int = 8  # questions per BIG-bench arithmetic subtask (8 subtasks: 1–2 digits × 4 operations)
    max_new_tokens: int = 6
    lee_blocks: int = 16  # 128-token blocks of lee_background for the perplexity-preservation claim
    calibration_samples: int = 64  # held apart from the training data (not in the step budget)
    intruder_layers: int = 12
    claims: bool = False  # True: run the papers' claims (claims.py) instead of the method grid
    claim_seeds: int = 3

    def __post_init__(self):
        if self.lr_points < 3:
            raise ValueError(f"lr_points must be at least 3 (a log grid around the method's LR), got {self.lr_points}.")
        if self.accuracy not in ("bigbench", "generated"):
            raise ValueError(f"accuracy must be 'bigbench' or 'generated', got {self.accuracy!r}.")
        if self.noise_seeds < 1 or self.steps < 1 or self.eval_every < 1 or self.lr_extend < 0:
            raise ValueError("noise_seeds, steps and eval_every must be positive, lr_extend >= 0.")
        if self.claim_seeds < 3:
            raise ValueError(f"claim_seeds must be at least 3 (a spread needs seeds), got {self.claim_seeds}.")
        for name in self.methods or ():
            method_class(name)

    @classmethod
    def quick(cls, **changes) -> "BenchConfig":
        """4 methods (LoRA, PiSSA, SVFit, full FT) × 3 LRs, 10 steps, 32 accuracy questions."""
        base = dict(methods=QUICK_METHODS, steps=10, eval_every=5, per_task=4, heldout_problems=24, top=1,
                    lee_blocks=8, intruder_layers=6)  # fmt: skip
        return cls(**{**base, **changes})

    @classmethod
    def claims_suite(cls, **changes) -> "BenchConfig":
        """The papers' claims at the scale that decides them: 3 seeds, 40 steps, evaluation every 10."""
        return cls(**{**dict(claims=True, steps=40, eval_every=10, claim_seeds=3), **changes})

    def method_list(self) -> list[str]:
        return list(self.methods) if self.methods else methods()

    def lr_grid(self, center: float) -> list[float]:
        half = (self.lr_points - 1) / 2
        return [float(f"{center * self.lr_ratio ** (i - half):.3g}") for i in range(self.lr_points)]


# -- the matched budget ----------------------------------------------------------------------------
def rank_options(name: str, rank: int) -> dict:
    """``{"rank": rank}`` plus the options that must follow the rank: AdaLoRA's ``target_r`` keeps its
    default ratio to the initial rank (8/12), so the run prunes as much as the default does."""
    cls = method_class(name)
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    if "target_r" in fields:
        return {"rank": rank, "target_r": max(1, round(rank * fields["target_r"] / fields["rank"]))}
    return {"rank": rank}


def _probe_count(name: str, options: dict, shape: tuple[int, int]) -> int | None:
    """Trainable count of one (m, n) layer under ``options``; None when the method refuses them."""
    from svdkit.adapters.api import build_layer

    m, n = shape
    linear = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(m, n, generator=torch.Generator().manual_seed(0)) / math.sqrt(n))
    try:
        cfg = config(name, **options)
        layer = build_layer(linear, cfg, cfg.initialize(linear.weight.detach()[None], ["probe"]), 0)
    except Refused:
        return None
    return sum(p.numel() for _, p in layer.adapter_parameters())


def _svd_option(name: str, svd: str) -> dict:
    """``{"svd": svd}``, or nothing for a method that needs its own (SoKA's rank rule needs the exact spectrum)."""
    try:
        config(name, svd=svd)
    except ValueError:
        return {}
    return {"svd": svd}


def matched_options(name: str, bench: BenchConfig, shape: tuple[int, int]) -> tuple[dict, str]:
    """(config options, how the budget was chosen) for method ``name`` on target shape (m, n)."""
    cls, svd = method_class(name), _svd_option(name, bench.svd)
    if name == "lora":
        return {"rank": bench.rank, **svd}, f"rank {bench.rank} (the budget)"
    if not cls.uses_rank:
        return svd, "paper default (adapts the full spectrum)"
    if cls.uses_calibration:
        return {"rank": bench.rank, **svd}, f"rank {bench.rank} (data-aware: LoRA's rank)"
    target, top = bench.rank * sum(shape), min(shape) - 1
    count_at = lambda r: _probe_count(name, {**rank_options(name, r), **svd}, shape)  # noqa: E731
    lo, hi = 1, top
    while lo < hi:  # smallest rank whose count reaches the budget (a refused rank counts as too small)
        mid = (lo + hi) // 2
        c = count_at(mid)
        lo, hi = (mid + 1, hi) if c is None or c < target else (lo, mid)
    counts = {r: count_at(r) for r in {max(1, lo - 1), lo}}
    counts = {r: c for r, c in counts.items() if c is not None}
    if not counts:
        return svd, "paper default (refuses every rank near the budget)"
    best = min(counts, key=lambda r: abs(counts[r] - target))
    if abs(counts[best] / target - 1) > 0.5:
        return svd, f"paper default (nearest count {counts[best]} vs budget {target})"
    return {**rank_options(name, best), **svd}, f"rank {best} ({counts[best]} vs budget {target} per {shape[0]}×{shape[1]})"


def target_shapes(model_name: str) -> tuple[tuple[int, int], int]:
    """(the most common all-linear target shape, the smallest target dimension) of the model."""
    from svdkit.adapters.layers import weight_matrix
    from svdkit.core.models import load_model
    from svdkit.core.targets import select_targets

    model, _ = load_model(model_name)
    shapes = Counter(tuple(weight_matrix(mod).shape) for _, mod in select_targets(model, "all-linear", None))
    return shapes.most_common(1)[0][0], min(min(shape) for shape in shapes)


# -- the plan --------------------------------------------------------------------------------------
def plan(bench: BenchConfig, shape: tuple[int, int], smallest: int | None = None) -> dict:
    """{"methods": {name: {"options", "budget", "lrs"}}, "cells": [...]}: the grid's first phase, or the
    claims' cells (``bench.claims``; ``smallest``: the smallest target dimension, SVFit's rank cap)."""
    if bench.claims:
        return claims.plan(bench, shape, smallest)
    info, cells = {}, [cell("base", {}, 0.0, bench.seed)]
    for name in bench.method_list():
        options, budget = matched_options(name, bench, shape)
        lrs = bench.lr_grid(method_class(name).lr)
        info[name] = {"options": options, "budget": budget, "lrs": lrs}
        cells += [cell(name, options, lr, bench.seed) for lr in lrs]
    return {"methods": info, "cells": cells}


def extension_cells(bench: BenchConfig, results: dict, info: dict) -> list[dict]:
    """One more LR past the edge for every method whose chosen LR is at an edge of its sweep, while fewer
    than ``lr_extend`` points were added on that side."""
    out = []
    for name, b in best_by_method(results, info).items():
        lr, grid_lrs = beyond(b, bench.lr_ratio), info[name]["lrs"]
        added = [x for x in b["sweep"] if x > max(grid_lrs)] if lr and lr > b["lr"] else \
            [x for x in b["sweep"] if x < min(grid_lrs)]  # fmt: skip
        if lr is not None and len(added) < bench.lr_extend:
            out.append(cell(name, info[name]["options"], lr, bench.seed))
    return out


def noise_cells(bench: BenchConfig, results: dict, info: dict) -> list[dict]:
    """Phase 2: the top adapter methods by the winner metric (and LoRA) at their chosen LR, further seeds."""
    from svdkit.benchmarking.report import ranking

    best = best_by_method(results, info)
    names = ranking(results, best)[: bench.top] + (["lora"] if "lora" in best else [])
    out = []
    for name in dict.fromkeys(names):
        for k in range(1, bench.noise_seeds):
            out.append(cell(name, info[name]["options"], best[name]["lr"], bench.seed + k))
    return out


# -- running ---------------------------------------------------------------------------------------
def load_results(out: Path) -> dict:
    return {json.loads(p.read_text())["cell"]["id"]: json.loads(p.read_text()) for p in (out / "cells").rglob(RESULT)}


def load_errors(out: Path) -> dict:
    """{cell id: error record} of the cells that failed and have no result yet (retried on resume)."""
    found = {}
    for p in (out / "cells").rglob(ERROR):
        if not (p.parent / RESULT).is_file():
            record = json.loads(p.read_text())
            found[record["cell"]["id"]] = record
    return found


def _run_groups(cells: list[dict], bench: BenchConfig, out: Path, bar, log, processes: bool = True) -> None:
    """One fresh process per method (``processes=False``: in this process, for tests); the bar advances
    as each cell finishes."""
    from svdkit.benchmarking.cell import run_spec

    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault(c["method"], []).append(c)
    for name, group in groups.items():
        pending = [c for c in group if not (out / "cells" / c["id"] / RESULT).is_file()]
        bar.update(len(group) - len(pending))
        spec = {"bench": dataclasses.asdict(bench), "out": str(out), "cells": pending}
        if not pending:
            continue
        if not processes:
            run_spec(spec, lambda cell_id: bar.update(1))
            continue
        path, errors = out / "specs" / f"{name}.json", out / "logs" / f"{name}.log"
        path.parent.mkdir(exist_ok=True)
        errors.parent.mkdir(exist_ok=True)
        write_text(path, json.dumps(spec, indent=1))
        with open(errors, "a") as err:
            proc = subprocess.Popen([sys.executable, "-m", "svdkit.benchmarking.cell", str(path)], stdout=subprocess.PIPE,
                                    stderr=err, text=True)  # fmt: skip
            for line in proc.stdout:
                if line.startswith("done "):
                    bar.set_postfix_str(line.split()[1])
                    bar.update(1)
            if proc.wait():
                log(f"svdkit bench: the {name} process failed (exit {proc.returncode}); see {errors}")


def _questions(bench: BenchConfig, out: Path, log) -> None:
    path = out / "questions.json"
    if path.is_file():
        return
    if bench.accuracy == "bigbench":
        items = bigbench.sample(bigbench.tasks(log=log), bench.per_task, bench.seed)
    else:  # our own direct questions ("What is a plus b?"), for tests and offline runs
        from svdkit.benchmarking.arithmetic import generate

        items = [{"question": f"What is {p['a']} {p['op'].replace('divided', 'divided by')} {p['b']}?",
                  "target": str(p["answer"]), "task": p["op"]}
                 for p in generate(8 * bench.per_task, seed=bench.data_seed + 1000)]  # fmt: skip
    write_text(path, json.dumps(items, indent=1) + "\n")


def _check_same(out: Path, bench: BenchConfig) -> None:
    path = out / "bench.json"
    now = json.loads(json.dumps(dataclasses.asdict(bench)))
    if path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in now if saved.get(k) != now[k])
        if diff:
            raise ValueError(f"{out} holds a bench with different settings ({', '.join(diff)}); "
                             "use another --out, or --fresh to start over.")  # fmt: skip
    else:
        if not out.exists() or not any(out.iterdir()):  # a folder of the user's own is never marked replaceable
            out.mkdir(parents=True, exist_ok=True)
            mark(out)
        write_text(path, json.dumps(now, indent=1) + "\n")


def run(bench: BenchConfig, out, *, fresh=False, progress=None, log=print, processes=True) -> dict:
    """Run (or resume) the bench into ``out``; writes report.md and curves.png; returns the summary.
    ``processes=False`` runs every cell in this process (tests: no interpreter start-ups)."""
    from tqdm.auto import tqdm

    from svdkit.benchmarking import report

    out = Path(out)
    if fresh:
        remove_output(out)  # only a folder svdkit wrote, never the current/home directory or their ancestors
    _check_same(out, bench)
    _questions(bench, out, log)
    plan_path = out / "plan.json"
    if not plan_path.is_file():
        write_text(plan_path, json.dumps(plan(bench, *target_shapes(bench.model)), indent=1) + "\n")
    the_plan = json.loads(plan_path.read_text())
    info = the_plan["methods"]
    expected = len(the_plan["cells"]) + (0 if bench.claims else (bench.noise_seeds - 1) * (bench.top + 1))
    with tqdm(total=expected, desc="svdkit bench", unit="run", disable=None if progress is None else not progress) as bar:
        _run_groups(the_plan["cells"], bench, out, bar, log, processes)
        if not bench.claims:
            for _ in range(bench.lr_extend):  # each round adds at most one point per method and side
                extra = extension_cells(bench, load_results(out), info)
                if not extra:
                    break
                bar.total += len(extra)
                _run_groups(extra, bench, out, bar, log, processes)
            extra = noise_cells(bench, load_results(out), info)
            bar.total = bar.n + len(extra)
            _run_groups(extra, bench, out, bar, log, processes)
    results, errors = load_results(out), load_errors(out)
    if errors:
        log(f"svdkit bench: {len(errors)} run(s) failed (listed in the report; run the same command to retry): "
            + ", ".join(sorted(errors)))  # fmt: skip
    summary = (claims.write if bench.claims else report.write)(out, bench, the_plan, results, errors)
    log(f"svdkit bench: report in {out / 'report.md'}")
    return summary
