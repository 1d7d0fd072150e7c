"""report.md (the table, the LR sweep, the winner and its margin over LoRA against seed noise, the claims)
and curves.png (held-out loss vs step, one line per method at its best LR)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from svdkit.core.files import write_text
from svdkit.benchmarking import claims
from svdkit.benchmarking.results import best_by_method, seed_spreads


def _fmt(x, spec=".3f"):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _acc(r):
    return None if r is None or "accuracy" not in r else 100 * r["accuracy"]["accuracy"]


def summarize(plan: dict, results: dict) -> dict:
    info = plan["methods"]
    best = best_by_method(results, info)
    spreads = seed_spreads(results, best)
    noise = max(spreads.values()) if spreads else None
    adapters = {n: b for n, b in best.items() if n != "full" and math.isfinite(b["best_heldout"])}
    winner = min(adapters, key=lambda n: adapters[n]["best_heldout"]) if adapters else None
    margin = (best["lora"]["best_heldout"] - best[winner]["best_heldout"]) if winner and "lora" in best else None
    return {"best": best, "spreads": spreads, "noise": noise, "winner": winner, "margin": margin,
            "exceeds_noise": None if margin is None or noise is None else margin > noise,
            "claims": claims.verdicts(plan, results, noise)}  # fmt: skip


def _table(info, best, winner) -> list[str]:
    lines = ["| method | budget | best LR | best held-out loss | accuracy % | trainable params | init s | median step s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in sorted(best, key=lambda n: best[n]["best_heldout"]):
        b, r = best[name], best[name]["result"]
        mark = " **(winner)**" if name == winner else (" (reference)" if name == "full" else "")
        lines.append(f"| {name}{mark} | {info[name]['budget']} | {b['lr']:.3g}{_edge(b)} | {_fmt(b['best_heldout'])} | {_fmt(_acc(r), '.1f')} "
                     f"| {r['params']:,} | {_fmt(r['init_s'], '.2f')} | {_fmt(r['step_s_median'], '.3f')} | {_fmt(r['peak_mib'], '.0f')} |")  # fmt: skip
    return lines


def _edge(b: dict) -> str:
    """↑ / ↓ when the best LR is the largest / smallest of the sweep (the optimum may lie outside it)."""
    lrs = sorted(b["sweep"])
    return "" if len(lrs) < 2 else "↑" if b["lr"] == lrs[-1] else "↓" if b["lr"] == lrs[0] else ""


def markdown(bench, plan: dict, results: dict, s: dict) -> str:
    info, best = plan["methods"], s["best"]
    base = next((r for r in results.values() if r["cell"]["method"] == "base"), {})
    source = "BIG-bench arithmetic (1–2 digits × +, −, ×, ÷)" if bench.accuracy == "bigbench" else "generated direct questions"
    out = [f"# svdkit bench: {bench.model}", "",
           f"{bench.steps} steps × batch {bench.batch_size} of generated arithmetic word problems (seed {bench.data_seed}); "
           f"held-out loss on {bench.heldout_problems} other generated problems every {bench.eval_every} steps; "
           f"exact-match accuracy on {source}, {bench.per_task} questions per subtask, greedy, {bench.max_new_tokens} new tokens; "
           f"budget: LoRA rank {bench.rank}; LR grid: {bench.lr_points} values × {bench.lr_ratio:.3g} around each method's paper LR.", "",
           f"Base model (floor): held-out loss {_fmt(base.get('heldout_loss'))}, zero-shot accuracy {_fmt(_acc(base), '.1f')} %, "
           f"lee_background perplexity {_fmt(base.get('lee_perplexity'), '.2f')}.", "", *_table(info, best, s["winner"]), "",
           "↑ / ↓: the best LR is the largest / smallest of the method's sweep, so its optimum may lie outside the "
           "grid (widen it with --lr-ratio or --lr-points).", ""]  # fmt: skip
    out += ["## Best LR per method (best held-out loss at each LR of the sweep)", "", "| method | sweep |", "|---|---|"]
    out += [f"| {n} | " + ", ".join(f"{lr:.3g}: {_fmt(v)}" + (" ←" if lr == b["lr"] else "") for lr, v in sorted(b["sweep"].items())) + " |"
            for n, b in sorted(best.items())]  # fmt: skip
    out += ["", "## Winner", ""]
    if s["winner"]:
        noise = "not measured" if s["noise"] is None else f"{s['noise']:.4f} (largest seed-to-seed spread: " + \
            ", ".join(f"{n} {v:.4f}" for n, v in sorted(s["spreads"].items())) + ")"  # fmt: skip
        exceeds = {True: "exceeds", False: "does not exceed", None: "cannot be compared with"}[s["exceeds_noise"]]
        out.append(f"**{s['winner']}**: best held-out loss {best[s['winner']]['best_heldout']:.4f}; margin over LoRA "
                   f"{_fmt(s['margin'], '+.4f')} nats, which {exceeds} the seed-to-seed noise {noise}.")  # fmt: skip
    out += ["", "## The papers' claims at this scale", "", "| claim | verdict | evidence |", "|---|---|---|"]
    out += [f"| {c['claim']} | {c['verdict']} | {c['evidence']} |" for c in s["claims"]]
    skipped = sorted((r["cell"]["id"], r["skipped"]) for r in results.values() if "skipped" in r)
    if skipped:
        out += ["", "## Skipped", ""] + [f"- {i}: {why}" for i, why in skipped]
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
            cut.append(name)  # diverged or destroyed at init (NLoRA's pinv init, …): off the chart, listed in the title
        ax.plot(*zip(*points), marker="o", markersize=3, label=f"{name} (lr {b['lr']:.2g})",
                linestyle="-" if name == "full" else styles[i % len(styles)], linewidth=2.5 if name == "full" else 1.2)
    title = "held-out loss at each method's best LR"
    if base_loss is not None:
        ax.set_ylim(top=1.3 * base_loss)
        title += f"\n(off the chart, above {1.5 * base_loss:.2f}: {', '.join(cut)})" if cut else ""
    ax.set(xlabel="step", ylabel="held-out loss", title=title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, bench, plan: dict, results: dict) -> dict:
    s = summarize(plan, results)
    write_text(out / "report.md", markdown(bench, plan, results, s))
    base = next((r for r in results.values() if r["cell"]["method"] == "base"), {})
    if s["best"]:
        plot(out / "curves.png", s["best"], base.get("heldout_loss"))
    slim = {k: v for k, v in s.items() if k != "best"}
    slim["best"] = {n: {"lr": b["lr"], "best_heldout": b["best_heldout"], "cell": b["result"]["cell"]["id"]} for n, b in s["best"].items()}
    write_text(out / "summary.json", json.dumps(slim, indent=1, default=float) + "\n")
    return slim
