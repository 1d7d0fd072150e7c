"""`svdkit bench --claims`: the papers' headline claims, each run at its paper configuration with several
seeds (``claim_seeds``, default 3) and more steps than the grid (default 40), with a verdict by a stated rule.

Every claim compares two arms trained on the same batches with the same seeds (paired), measured on the
test split at the checkpoint chosen on the validation split (as the grid). Per seed s the difference
d_s = (other − claimed-better) for a lower-is-better metric (the reverse for intruders) is taken;
d̄ ± sd are its mean and sample standard deviation over the seeds. Rule (fixed in advance):

- **holds** if d̄ > 2·sd (and d̄ > 0): the claimed direction, separated from the seed-to-seed spread;
- **does not hold** if d̄ < −2·sd: the opposite direction, separated;
- **inconclusive** otherwise: this run cannot separate the arms.

"Comparable with far fewer parameters" claims (SVFT, SVFit) hold if the trainable count is ≤ 1/10 of
LoRA's and the gap g = (method − LoRA) test loss satisfies ḡ + 2·sd ≤ 0.05 nats; they do not hold if the
count is larger or ḡ − 2·sd > 0.05; otherwise inconclusive.

1. PiSSA converges faster than LoRA (https://arxiv.org/abs/2404.02948): same rank, PiSSA's paper LR 2e-5
   for both (the paper's comparison); metric: mean validation loss over the evaluations (area under the curve).
2. MiLoRA (https://arxiv.org/abs/2406.09044) preserves more base perplexity (gensim lee_background, plain
   English unrelated to the arithmetic) than PiSSA, both at MiLoRA's paper LR 3e-4 (its paper trains
   LoRA/PiSSA/MiLoRA with the same hyper-parameters).
3. CorDA-KPA (https://arxiv.org/abs/2406.05223) preserves more than PiSSA, both at CorDA's paper LR. Its
   covariance comes from the bench's held-apart calibration problems, not NQ/TriviaQA (none offline).
4. SVFT (https://arxiv.org/abs/2405.19597): plain pattern, its code's kaiming core, lr 5e-2 vs LoRA at
   LoRA's paper LR 2e-4 and the bench rank.
5. SVFit (https://arxiv.org/abs/2409.05926) with its 99 %-energy rule (``energy=0.99``, rank capped only by
   the smallest target dimension) vs the same LoRA arm.
6. EVA's rank redistribution (https://arxiv.org/abs/2410.07170): ρ = 2 vs ρ = 1 (uniform ranks, the
   paper's ablation) at EVA's paper LR; metric: test loss.
7. LoRA creates more intruder dimensions than full fine-tuning (https://arxiv.org/abs/2410.21228): top-10
   left singular vectors, ε = 0.5, over evenly spaced target matrices, each at its paper LR.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from svdkit.core.files import write_text
from svdkit.core.registry import method_class
from svdkit.benchmarking.results import cell, ok

COMPARABLE_NATS = 0.05
FEWER = 0.1
RULE = ("paired over seeds: holds if the mean difference in the claimed direction exceeds 2× its standard "
        "deviation over seeds, does not hold if it exceeds it in the other direction, else inconclusive")  # fmt: skip


def _arms(bench, smallest: int) -> dict:
    """{arm label: (method, options, lr)} at each claim's paper configuration."""
    r, lr = bench.rank, lambda name: method_class(name).lr  # noqa: E731
    arms = {
        "lora@pissa-lr": ("lora", {"rank": r}, lr("pissa")),
        "pissa": ("pissa", {"rank": r}, lr("pissa")),
        "milora": ("milora", {"rank": r}, lr("milora")),
        "pissa@milora-lr": ("pissa", {"rank": r}, lr("milora")),
        "corda-kpa": ("corda", {"rank": r, "mode": "kpa"}, lr("corda")),
        "svft": ("svft", {}, lr("svft")),
        "svfit-0.99": ("svfit", {"rank": smallest - 1, "energy": 0.99}, lr("svfit")),
        "lora": ("lora", {"rank": r}, lr("lora")),
        "eva": ("eva", {"rank": r, "rho": 2}, lr("eva")),
        "eva-uniform": ("eva", {"rank": r, "rho": 1}, lr("eva")),
        "full": ("full", {}, lr("full")),
    }
    if lr("corda") != lr("pissa"):
        arms["pissa@corda-lr"] = ("pissa", {"rank": r}, lr("corda"))
    return arms


def _mean_val(r):
    finite = [v for _, v in r["curve"] if math.isfinite(v)]
    return statistics.fmean(finite) if len(finite) == len(r["curve"]) and finite else math.inf


# (id, claim, claimed-better arm, other arm, metric name, metric, "lower" | "higher" | "comparable")
CLAIMS = (
    ("pissa-faster", "PiSSA converges faster than LoRA (same rank and LR)", "pissa", "lora@pissa-lr",
     "mean validation loss over the evaluations", _mean_val, "lower"),
    ("milora-preserves", "MiLoRA preserves more base perplexity than PiSSA", "milora", "pissa@milora-lr",
     "lee_background perplexity after training", lambda r: r["lee_perplexity"], "lower"),
    ("corda-kpa-preserves", "CorDA-KPA preserves more base perplexity than PiSSA", "corda-kpa", "pissa@corda-lr",
     "lee_background perplexity after training", lambda r: r["lee_perplexity"], "lower"),
    ("svft-fewer", "SVFT reaches LoRA's loss with ≤ 1/10 of its parameters", "svft", "lora",
     "test loss", lambda r: r["test_loss"], "comparable"),
    ("svfit-fewer", "SVFit (99 % energy) reaches LoRA's loss with ≤ 1/10 of its parameters", "svfit-0.99", "lora",
     "test loss", lambda r: r["test_loss"], "comparable"),
    ("eva-redistribution", "EVA's rank redistribution beats uniform ranks (same budget)", "eva", "eva-uniform",
     "test loss", lambda r: r["test_loss"], "lower"),
    ("lora-intruders", "LoRA creates more intruder dimensions than full fine-tuning", "lora", "full",
     "intruder dimensions (k = 10, ε = 0.5)", lambda r: r["intruders"]["total"], "higher"),
)  # fmt: skip


MEASURES = {"milora-preserves": "lee", "corda-kpa-preserves": "lee", "lora-intruders": "intruders"}


def _resolve(arms: dict, label: str) -> str:
    return label if label in arms or label != "pissa@corda-lr" else "pissa"  # PiSSA's LR is CorDA's: shared arm


def plan(bench, shape: tuple[int, int], smallest: int | None = None) -> dict:
    """The claims whose methods are all in the bench (every claim by default) and their arms' cells, one
    per seed: {"methods": {}, "claims": [ids], "arms": {label: ...}, "cells": [...]}."""
    arms = _arms(bench, smallest or min(shape))
    wanted = set(bench.methods) if bench.methods else None
    chosen, used, measures = [], {}, {}
    for cid, _, better, other, *_ in CLAIMS:
        labels = [_resolve(arms, better), _resolve(arms, other)]
        if wanted is None or all(arms[x][0] in wanted for x in labels):
            chosen.append(cid)
            used.update({x: arms[x] for x in labels})
            for x in labels:
                measures.setdefault(x, set()).update({MEASURES[cid]} if cid in MEASURES else set())
    seeds = range(bench.seed, bench.seed + bench.claim_seeds)
    cells = [cell("base", {}, 0.0, bench.seed)]
    cells += [cell(m, opts, lr, s, label, measures[label]) for label, (m, opts, lr) in used.items() for s in seeds]
    return {"methods": {}, "claims": chosen, "arms": used, "cells": cells}


def _values(results: dict, label: str, seeds, key) -> list[float] | None:
    by_seed = {r["cell"]["seed"]: r for r in results.values() if r["cell"]["label"] == label and ok(r)}
    if any(s not in by_seed for s in seeds):
        return None
    return [float(key(by_seed[s])) for s in seeds]


def _ms(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def decide(better: list[float], other: list[float], direction: str, ratio: float | None = None) -> tuple[str, list[float]]:
    """(verdict, per-seed differences) by the module's rule; ``ratio``: trainable count / LoRA's (comparable)."""
    if direction == "comparable":
        d = [b - o for b, o in zip(better, other)]  # the method's gap above LoRA
        m, sd = statistics.fmean(d), statistics.stdev(d)
        if ratio is not None and ratio > FEWER or m - 2 * sd > COMPARABLE_NATS:
            return "does not hold", d
        return ("holds" if m + 2 * sd <= COMPARABLE_NATS else "inconclusive"), d
    d = [(o - b) if direction == "lower" else (b - o) for b, o in zip(better, other)]
    m, sd = statistics.fmean(d), statistics.stdev(d)
    if m > 0 and m > 2 * sd:
        return "holds", d
    return ("does not hold" if m < 0 and -m > 2 * sd else "inconclusive"), d


def verdicts(the_plan: dict, results: dict, seeds) -> list[dict]:
    rows, arms = [], the_plan["arms"]
    for cid, claim, better, other, metric_name, metric, direction in CLAIMS:
        if cid not in the_plan["claims"]:
            continue
        better, other = _resolve(arms, better), _resolve(arms, other)
        row = {"id": cid, "claim": claim, "metric": metric_name, "better": better, "other": other,
               "config": {x: {"method": arms[x][0], **arms[x][1], "lr": arms[x][2]} for x in (better, other)}}
        a, b = _values(results, better, seeds, metric), _values(results, other, seeds, metric)
        if a is None or b is None:
            rows.append({**row, "verdict": "not run", "evidence": "missing runs (see the failures)"})
            continue
        pa = _values(results, better, seeds, lambda r: r["params"])
        po = _values(results, other, seeds, lambda r: r["params"])
        ratio = pa[0] / po[0] if direction == "comparable" else None
        verdict, d = decide(a, b, direction, ratio)
        rows.append({**row, "verdict": verdict, "better_values": a, "other_values": b, "diff": d,
                     "evidence": f"{better} {_ms(a)} vs {other} {_ms(b)}; paired difference {_ms(d)}"
                     + (f"; params {int(pa[0]):,} = {ratio:.3f}× LoRA's" if ratio is not None else "")})  # fmt: skip
    return rows


def markdown(bench, the_plan: dict, results: dict, rows: list[dict], errors: dict | None) -> str:
    base = next((r for r in results.values() if r["cell"]["method"] == "base"), {})
    out = [f"# svdkit bench --claims: {bench.model}", "",
           f"Each claim at its paper configuration, {bench.claim_seeds} seeds (seeds {bench.seed}–"
           f"{bench.seed + bench.claim_seeds - 1}, paired: both arms see the same batches), {bench.steps} steps × batch "
           f"{bench.batch_size} of generated arithmetic problems; checkpoint chosen on a validation split of "
           f"{bench.heldout_problems} problems, metrics on a separate test split of {bench.test_problems}; "
           f"calibration on {bench.calibration_samples} held-apart problems. Values: mean ± sample standard "
           f"deviation over the seeds.", "", f"Rule: {RULE}. {COMPARABLE_NATS} nats / ≤ {FEWER}× parameters for the "
           "'far fewer parameters' claims (see svdkit/benchmarking/claims.py).", "",
           f"Base model: test loss {base.get('test_loss', math.nan):.3f}, lee_background perplexity "
           f"{base.get('lee_perplexity', math.nan):.2f}.", "",
           "| claim | metric | evidence (mean ± sd over seeds) | verdict |", "|---|---|---|---|"]  # fmt: skip
    out += [f"| {r['claim']} | {r['metric']} | {r['evidence']} | **{r['verdict']}** |" for r in rows]
    out += ["", "Configurations:", ""]
    out += [f"- {r['id']}: " + "; ".join(f"{k} = {json.dumps(v)}" for k, v in r["config"].items()) for r in rows]
    if errors:
        out += ["", "## Failed runs (run the same command to retry them)", ""]
        out += [f"- {i}: {e['error']}" for i, e in sorted(errors.items())]
    return "\n".join(out) + "\n"


def write(out: Path, bench, the_plan: dict, results: dict, errors: dict | None = None) -> dict:
    seeds = list(range(bench.seed, bench.seed + bench.claim_seeds))
    rows = verdicts(the_plan, results, seeds)
    write_text(out / "report.md", markdown(bench, the_plan, results, rows, errors))
    summary = {"claims": rows, "seeds": seeds, "steps": bench.steps, "errors": sorted(errors or ())}
    write_text(out / "summary.json", json.dumps(summary, indent=1, default=float) + "\n")
    return summary
