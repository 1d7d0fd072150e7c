"""`svdkit bench`: the plan (methods × LR grid × seeds, plus claim variants) and its resumable runner.

Each method runs at a matched trainable-parameter budget where it allows one (the rank whose trainable
count on the model's most common target shape is nearest LoRA's r(m+n) at the bench rank, probed on a
seeded random matrix of that shape; data-aware methods take LoRA's rank; full-spectrum methods and
methods whose count cannot come within 50% of the budget keep their paper defaults), with an LR sweep
of ``lr_points`` values on a log grid of ratio ``lr_ratio`` centred on the method's ``lr`` ClassVar,
the same data order, seeds and step budget. Cells run method by method in fresh processes
(``svdkit.benchmarking.cell``); a cell with a ``result.json`` is never recomputed. After the grid, the top
methods (and LoRA) run again with ``noise_seeds - 1`` more seeds at their best LR: the seed-to-seed noise.
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

from svdkit.core.registry import config, method_class, methods
from svdkit.core.files import write_text
from svdkit.benchmarking import bigbench, claims
from svdkit.benchmarking.results import best_by_method, cell
from svdkit.benchmarking.cell import RESULT

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
    seed: int = 0
    noise_seeds: int = 2  # seeds run by the top methods (and LoRA) at their best LR
    top: int = 3
    data_seed: int = 0
    train_problems: int = 2000
    heldout_problems: int = 32
    accuracy: str = "bigbench"  # "bigbench" (downloads the sdist once) or "generated" (offline / tests)
    per_task: int = 8  # questions per BIG-bench arithmetic subtask (8 subtasks: 1–2 digits × 4 operations)
    max_new_tokens: int = 6
    lee_blocks: int = 16  # 128-token blocks of lee_background for the perplexity-preservation claim
    calibration_samples: int = 64
    intruder_layers: int = 12
    claims: bool = True

    def __post_init__(self):
        if self.lr_points < 3:
            raise ValueError(f"lr_points must be at least 3 (a log grid around the method's LR), got {self.lr_points}.")
        if self.accuracy not in ("bigbench", "generated"):
            raise ValueError(f"accuracy must be 'bigbench' or 'generated', got {self.accuracy!r}.")
        if self.noise_seeds < 1 or self.steps < 1 or self.eval_every < 1:
            raise ValueError("noise_seeds, steps and eval_every must be positive.")
        for name in self.methods or ():
            method_class(name)

    @classmethod
    def quick(cls, **changes) -> "BenchConfig":
        """4 methods (LoRA, PiSSA, SVFit, full FT) × 3 LRs, 10 steps, 32 accuracy questions."""
        base = dict(methods=QUICK_METHODS, steps=10, eval_every=5, per_task=4, heldout_problems=24, top=1,
                    lee_blocks=8, intruder_layers=6)  # fmt: skip
        return cls(**{**base, **changes})

    def method_list(self) -> list[str]:
        return list(self.methods) if self.methods else methods()

    def lr_grid(self, center: float) -> list[float]:
        half = (self.lr_points - 1) / 2
        return [float(f"{center * self.lr_ratio ** (i - half):.3g}") for i in range(self.lr_points)]


# -- the matched budget ----------------------------------------------------------------------------
def _probe_count(name: str, options: dict, shape: tuple[int, int]) -> int:
    from svdkit.adapters.api import build_layer

    m, n = shape
    linear = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(m, n, generator=torch.Generator().manual_seed(0)) / math.sqrt(n))
    cfg = config(name, **options)
    layer = build_layer(linear, cfg, cfg.initialize(linear.weight.detach()[None], ["probe"]), 0)
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
    try:
        lo, hi = 1, top
        while lo < hi:  # smallest rank whose count reaches the budget
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if _probe_count(name, {"rank": mid, **svd}, shape) < target else (lo, mid)
        best = min((max(1, lo - 1), lo), key=lambda r: abs(_probe_count(name, {"rank": r, **svd}, shape) - target))
        count = _probe_count(name, {"rank": best, **svd}, shape)
    except (ValueError, TypeError, NotImplementedError) as exc:
        return svd, f"paper default (probe failed: {exc})"
    if abs(count / target - 1) > 0.5:
        return svd, f"paper default (nearest count {count} vs budget {target})"
    return {"rank": best, **svd}, f"rank {best} ({count} vs budget {target} per {shape[0]}×{shape[1]})"


def common_shape(model_name: str) -> tuple[int, int]:
    from svdkit.adapters.layers import weight_matrix
    from svdkit.core.models import load_model
    from svdkit.core.targets import select_targets

    model, _ = load_model(model_name)
    shapes = Counter(tuple(weight_matrix(mod).shape) for _, mod in select_targets(model, "all-linear", None))
    return shapes.most_common(1)[0][0]


# -- the plan --------------------------------------------------------------------------------------
def plan(bench: BenchConfig, shape: tuple[int, int]) -> dict:
    """{"methods": {name: {"options", "budget", "lrs"}}, "cells": [...]} — phase 1 (grid + claim cells)."""
    info, cells = {}, [cell("base", {}, 0.0, bench.seed)]
    for name in bench.method_list():
        options, budget = matched_options(name, bench, shape)
        lrs = bench.lr_grid(method_class(name).lr)
        info[name] = {"options": options, "budget": budget, "lrs": lrs}
        cells += [cell(name, options, lr, bench.seed) for lr in lrs]
    if bench.claims:
        cells = claims.extra_cells(bench, info, cells)
    return {"methods": info, "cells": cells}


def noise_cells(bench: BenchConfig, results: dict, info: dict) -> list[dict]:
    """Phase 2: the top adapter methods (and LoRA) at their best LR with the further seeds."""

    best = best_by_method(results, info)
    ranked = sorted((b["best_heldout"], name) for name, b in best.items()
                    if math.isfinite(b["best_heldout"]) and name != "full")  # the reference row needs no noise
    names = [name for _, name in ranked[: bench.top]] + (["lora"] if "lora" in best else [])
    out = []
    for name in dict.fromkeys(names):
        for k in range(1, bench.noise_seeds):
            out.append(cell(name, info[name]["options"], best[name]["lr"], bench.seed + k))
    return out


# -- running ---------------------------------------------------------------------------------------
def load_results(out: Path) -> dict:
    return {json.loads(p.read_text())["cell"]["id"]: json.loads(p.read_text()) for p in (out / "cells").rglob(RESULT)}


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
        out.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(now, indent=1) + "\n")


def run(bench: BenchConfig, out, *, fresh=False, progress=None, log=print, processes=True) -> dict:
    """Run (or resume) the bench into ``out``; writes report.md and curves.png; returns the summary.
    ``processes=False`` runs every cell in this process (tests: no interpreter start-ups)."""
    from tqdm.auto import tqdm

    from svdkit.benchmarking import report

    out = Path(out)
    if fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    _check_same(out, bench)
    _questions(bench, out, log)
    plan_path = out / "plan.json"
    if not plan_path.is_file():
        write_text(plan_path, json.dumps(plan(bench, common_shape(bench.model)), indent=1) + "\n")
    the_plan = json.loads(plan_path.read_text())
    expected = len(the_plan["cells"]) + (bench.noise_seeds - 1) * (bench.top + 1)
    with tqdm(total=expected, desc="svdkit bench", unit="run", disable=None if progress is None else not progress) as bar:
        _run_groups(the_plan["cells"], bench, out, bar, log, processes)
        results = load_results(out)
        extra = noise_cells(bench, results, the_plan["methods"])
        bar.total = len(the_plan["cells"]) + len(extra)
        _run_groups(extra, bench, out, bar, log, processes)
    results = load_results(out)
    summary = report.write(out, bench, the_plan, results)
    log(f"svdkit bench: report in {out / 'report.md'}, curves in {out / 'curves.png'}")
    return summary
