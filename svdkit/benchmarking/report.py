"""report.md (the table, the LR sweeps, the winner against the seed noise and the accuracy intervals, the
failures) and curves.png (validation loss vs step, one line per method at its chosen LR) of the method grid.

Selection and reporting are separate: the LR and the checkpoint are chosen on the validation split, the
table reports the test split's loss and the accuracy questions at that checkpoint. The winner metric,
fixed before any run: the highest test accuracy among the adapter methods whose test loss is below the
untrained base model's (full fine-tuning is the reference row, not a contender); ties by the lower test
loss. Accuracy comes with its Wilson 95 % interval: a lead inside the runner-up's interval is reported as
not separated.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from svdkit.core.files import write_text
from svdkit.benchmarking.results import accuracy_ci, best_by_method, capped, edge, seed_spreads

# the same computation on the default model, so never two independent results (see the report's note)
SAME_COMPUTATION = {("clip-svd", "vectorfit"): "VectorFit = CLIP-SVD here: the target linears have no biases "
                    "(no Δb) and Adaptive Vector Freezing never fires within the bench's steps, so both train "
                    "exactly the singular values of every target: one result, not two."}  # fmt: skip


def _fmt(x, spec=".3f"):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _base(results: dict) -> dict:
    return next((r for r in results.values() if r["cell"]["method"] == "base"), {})


def ranking(results: dict, best: dict) -> list[str]:
    """Adapter methods in winner-metric order: those with a test loss below the base model's first, by test
    accuracy (higher first), then by test loss; full fine-tuning (the reference) is left out."""
    base_loss = _base(results).get("test_loss", math.inf)

    def key(name):
        r = best[name]["result"]
        acc = r["accuracy"]["accuracy"] if "accuracy" in r else -1.0
        return (not r["test_loss"] < base_loss, -acc, r["test_loss"])

    return sorted((n for n, b in best.items() if n != "full" and math.isfinite(b["val_loss"])), key=key)


SAME_RTOL = 1e-2  # two implementations of one computation differ in the last bits, amplified by training


def identical(best: dict) -> list[tuple[str, str]]:
    """Pairs of methods whose chosen runs computed the same thing: equal LR, parameter count and validation
    curve; exactly equal for any pair, or within SAME_RTOL at every point for a pair in SAME_COMPUTATION
    (their two code paths round differently: VectorFit vs CLIP-SVD differed by 2e-3 nats after 5 steps at
    lr 0.05 in the default bench)."""
    names, pairs = sorted(best), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ra, rb = best[a]["result"], best[b]["result"]
            if ra["params"] != rb["params"] or best[a]["lr"] != best[b]["lr"] or len(ra["curve"]) != len(rb["curve"]):
                continue
            rtol = SAME_RTOL if (a, b) in SAME_COMPUTATION else 0.0
            if all(sa == sb and abs(va - vb) <= rtol * abs(vb) for (sa, va), (sb, vb) in zip(ra["curve"], rb["curve"])):
                pairs.append((a, b))
    return pairs


def summarize(plan: dict, results: dict, capped_names: set | None = None) -> dict:
    info = plan["methods"]
    best = best_by_method(results, info)
    order = ranking(results, best)
    winner = order[0] if order else None
    runner = order[1] if len(order) > 1 else None
    ci = {n: accuracy_ci(b["result"]) for n, b in best.items()}
    separated = None
    if winner and runner and ci[winner] and ci[runner]:
        separated = ci[runner][0] < ci[winner][1]  # the runner-up's accuracy below the winner's interval
    return {"best": best, "spreads": seed_spreads(results, best), "winner": winner, "runner_up": runner,
            "separated": separated, "ci": ci, "capped": sorted(capped_names or ()), "identical": identical(best)}  # fmt: skip


def _row(name, b, info, s, winner) -> str:
    r, ci = b["result"], s["ci"][name]
    mark = " **(winner)**" if name == winner else (" (reference)" if name == "full" else "")
    lr = f"{b['lr']:.3g}{edge(b)}" + (" capped" if name in s["capped"] else "")
    acc = "—" if ci is None else f"{ci[0]:.1f} [{ci[1]:.0f}, {ci[2]:.0f}]"
    return (f"| {name}{mark} | {info[name]['budget']} | {lr} | {_fmt(b['val_loss'])} (step {r['best_step']}) "
            f"| {_fmt(r['test_loss'])} | {acc} | {r['params']:,} | {_fmt(r['init_s'], '.2f')} "
            f"| {_fmt(r['step_s_median'], '.3f')} | {_fmt(r['peak_mib'], '.0f')} |")  # fmt: skip


def markdown(bench, plan: dict, results: dict, s: dict, errors: dict | None = None) -> str:
    info, best, base = plan["methods"], s["best"], _base(results)
    source = "BIG-bench arithmetic (1–2 digits × +, −, ×, ÷)" if bench.accuracy == "bigbench" else "generated direct questions"
    base_ci = accuracy_ci(base)
    out = [f"# svdkit bench: {bench.model}", "",
           f"{bench.steps} steps × batch {bench.batch_size} of generated arithmetic word problems (seed {bench.data_seed}). "
           f"**Selection vs reporting**: the LR and the checkpoint (evaluated every {bench.eval_every} steps) are chosen "
           f"on a validation split of {bench.heldout_problems} problems; the table reports a separate test split of "
           f"{bench.test_problems} problems and exact-match accuracy on {source} ({bench.per_task} per subtask, greedy, "
           f"{bench.max_new_tokens} new tokens) at that checkpoint. **Budget**: LoRA rank {bench.rank}; every method "
           f"takes the same {bench.steps} steps on the same batches; the data-aware methods' calibration "
           f"({bench.calibration_samples} examples, LoRA-One's/LoRA-GA's gradient step included) uses held-apart "
           f"problems that no method trains on, and is not counted in the step budget. LR grid: {bench.lr_points} "
           f"values × {bench.lr_ratio:.3g} around each method's paper LR, extended past an edge up to "
           f"{bench.lr_extend} points per side. Every row is a single run (seed {bench.seed}); 'step s' is the "
           f"median over that run's steps.", "",
           f"Base model (floor): validation loss {_fmt(base.get('val_loss'))}, test loss {_fmt(base.get('test_loss'))}, "
           f"zero-shot accuracy {'—' if base_ci is None else f'{base_ci[0]:.1f} % [{base_ci[1]:.0f}, {base_ci[2]:.0f}]'}, "
           f"lee_background perplexity {_fmt(base.get('lee_perplexity'), '.2f')}.", "",
           "| method | budget | chosen LR | val loss (checkpoint) | test loss | test accuracy % [95 % CI] | trainable params "
           "| init s | step s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    order = ranking(results, best) + [n for n in sorted(best) if n not in ranking(results, best)]
    out += [_row(n, best[n], info, s, s["winner"]) for n in order]
    out += ["", "↑ / ↓: the chosen LR is the largest / smallest of the sweep; 'capped': still at the edge after "
            f"{bench.lr_extend} added points (its optimum may lie beyond). Rows are in winner-metric order.", ""]
    for pair in s["identical"]:
        note = SAME_COMPUTATION.get(tuple(sorted(pair)), "the same computation on this model")
        out += [f"Note ({' = '.join(pair)}): {note}", ""]
    out += ["## LR sweeps (validation loss at each LR)", "", "| method | sweep |", "|---|---|"]
    out += [f"| {n} | " + ", ".join(f"{lr:.3g}: {_fmt(v)}" + (" ←" if lr == b["lr"] else "") for lr, v in sorted(b["sweep"].items())) + " |"
            for n, b in sorted(best.items())]  # fmt: skip
    out += ["", "## Winner (metric fixed in advance)", "",
            "Highest test accuracy among the adapter methods whose test loss is below the base model's; ties by test loss."]
    w = s["winner"]
    if w:
        ci, sep = s["ci"][w], s["separated"]
        runner = s["runner_up"]
        verdict = {True: "is outside", False: "is inside", None: "cannot be compared with"}[sep]
        out.append(f"\n**{w}**: test accuracy {ci[0]:.1f} % [{ci[1]:.0f}, {ci[2]:.0f}], test loss "
                   f"{best[w]['result']['test_loss']:.3f}. The runner-up ({runner or '—'}) {verdict} this interval"
                   + ("" if sep else ": the bench does not separate them") + ".")  # fmt: skip
    if s["spreads"]:
        out += ["", "Seed-to-seed spread at the chosen LR (sample standard deviation over the seeds):", ""]
        out += [f"- {n}: test loss ± {v['test_loss']:.4f}, accuracy ± {_fmt(v['accuracy'], '.1f')} points ({v['seeds']} seeds)"
                for n, v in sorted(s["spreads"].items())]  # fmt: skip
    out += ["", "The papers' claims are decided by `svdkit bench --claims` (several seeds, each claim's paper "
            "configuration), not by this grid."]
    skipped = sorted((r["cell"]["id"], r["skipped"]) for r in results.values() if "skipped" in r)
    if skipped:
        out += ["", "## Refused configurations", ""] + [f"- {i}: {why}" for i, why in skipped]
    if errors:
        out += ["", "## Failed runs (not results: run the same command to retry them)", ""]
        out += [f"- {i}: {e['error']}" for i, e in sorted(errors.items())]
    return "\n".join(out) + "\n"


def plot(path: Path, best: dict, base_loss: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    styles, cut = ("-", "--", ":", "-."), []
    for i, (name, b) in enumerate(sorted(best.items())):
        points = [(s, v) for s, v in b["result"]["curve"] if math.isfinite(v)]
        if base_loss is not None:
            points = [(0, base_loss)] + points
        if base_loss is not None and min(v for _, v in points[1:] or points) > 1.5 * base_loss:
            cut.append(name)  # diverged or destroyed at init: off the chart, listed in the title
        ax.plot(*zip(*points), marker="o", markersize=3, label=f"{name} (lr {b['lr']:.2g})",
                linestyle="-" if name == "full" else styles[i % len(styles)], linewidth=2.5 if name == "full" else 1.2)
    title = "validation loss at each method's chosen LR"
    if base_loss is not None:
        ax.set_ylim(top=1.3 * base_loss)
        title += f"\n(off the chart, above {1.5 * base_loss:.2f}: {', '.join(cut)})" if cut else ""
    ax.set(xlabel="step", ylabel="validation loss", title=title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, bench, plan: dict, results: dict, errors: dict | None = None) -> dict:
    best = best_by_method(results, plan["methods"])
    s = summarize(plan, results, capped(bench.lr_extend, best, plan["methods"]))
    write_text(out / "report.md", markdown(bench, plan, results, s, errors))
    if s["best"]:
        plot(out / "curves.png", s["best"], _base(results).get("val_loss"))
    slim = {k: v for k, v in s.items() if k != "best"}
    slim["best"] = {n: {"lr": b["lr"], "val_loss": b["val_loss"], "test_loss": b["result"]["test_loss"],
                        "cell": b["result"]["cell"]["id"]} for n, b in s["best"].items()}  # fmt: skip
    slim["errors"] = sorted(errors or ())
    write_text(out / "summary.json", json.dumps(slim, indent=1, default=float) + "\n")
    return slim
