"""A bench cell's spec and what the results say: each method's LR and checkpoint chosen on the validation
split, its test-split numbers, accuracy confidence intervals, the LR sweep's edges, the seed-to-seed spread.

A cell's ``result.json`` holds ``val_loss`` (the best validation loss over its checkpoints: the selection
criterion), ``test_loss`` and ``accuracy`` (measured on the test split and the accuracy questions at that
checkpoint: what is reported), or ``skipped`` when the method refused the configuration
(:class:`svdkit.core.registry.Refused`). Failures are not results: they go to ``error.json`` (see cell.py).
"""

from __future__ import annotations

import math
import statistics

Z95 = 1.959964  # two-sided 95 % normal quantile


def cell(method: str, options: dict, lr: float, seed: int, label: str | None = None, measure=()) -> dict:
    label = label or method
    return {"id": f"{label}/lr{lr:.2e}/s{seed}", "label": label, "method": method, "options": options,
            "lr": lr, "seed": seed, "measure": sorted(measure)}  # fmt: skip


def wilson(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion correct/n (as fractions); (0, 1) when n = 0.

    p̃ = (p + z²/2n)/(1 + z²/n),  half-width = z·√(p(1 − p)/n + z²/4n²)/(1 + z²/n)."""
    if n <= 0:
        return 0.0, 1.0
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_ci(result: dict | None) -> tuple[float, float, float] | None:
    """(accuracy, low, high) in percent with the Wilson 95 % interval, or None."""
    if not result or "accuracy" not in result:
        return None
    acc, n = result["accuracy"]["accuracy"], result["accuracy"]["n"]
    lo, hi = wilson(acc * n, n)
    return 100 * acc, 100 * lo, 100 * hi


def ok(result: dict) -> bool:
    return "skipped" not in result


def _grid_seed(results: dict) -> int:
    return min((r["cell"]["seed"] for r in results.values()), default=0)


def best_by_method(results: dict, info: dict) -> dict:
    """{method: {"lr", "val_loss", "result", "sweep": {lr: val loss}}}: the grid seed's LR sweep, the LR with
    the lowest validation loss (at its best checkpoint) chosen."""
    seed, out = _grid_seed(results), {}
    for r in results.values():
        c = r["cell"]
        if c["label"] not in info or c["seed"] != seed or not ok(r):
            continue
        entry = out.setdefault(c["label"], {"lr": None, "val_loss": math.inf, "result": None, "sweep": {}})
        entry["sweep"][c["lr"]] = r["val_loss"]
        if entry["result"] is None or r["val_loss"] < entry["val_loss"]:
            entry.update(lr=c["lr"], val_loss=r["val_loss"], result=r)
    return out


def edge(best: dict) -> str:
    """"↑" / "↓" when the chosen LR is the largest / smallest of the sweep (the optimum may lie beyond it)."""
    lrs = sorted(best["sweep"])
    if len(lrs) < 2 or not math.isfinite(best["val_loss"]):
        return ""
    return "↑" if best["lr"] == lrs[-1] else "↓" if best["lr"] == lrs[0] else ""


def beyond(best: dict, ratio: float) -> float | None:
    """The next LR past the sweep's edge where the chosen LR sits (None when it is interior)."""
    mark, lrs = edge(best), sorted(best["sweep"])
    if not mark:
        return None
    return float(f"{(lrs[-1] * ratio if mark == '↑' else lrs[0] / ratio):.3g}")


def capped(lr_extend: int, best: dict, info: dict) -> set[str]:
    """Methods whose chosen LR is still at an edge after ``lr_extend`` points were added on that side."""
    out = set()
    for name, b in best.items():
        grid_lrs, mark = info[name]["lrs"], edge(b)
        side = [x for x in b["sweep"] if (x > max(grid_lrs) if mark == "↑" else x < min(grid_lrs))]
        if mark and len(side) >= lr_extend:
            out.add(name)
    return out


def seed_values(results: dict, label: str, lr: float, key) -> list[float]:
    """``key(result)`` over the seeds run for (label, lr), in seed order (failed/refused cells left out)."""
    rows = sorted((r for r in results.values() if r["cell"]["label"] == label and r["cell"]["lr"] == lr and ok(r)),
                  key=lambda r: r["cell"]["seed"])  # fmt: skip
    return [float(key(r)) for r in rows]


def spread(values: list[float]) -> float | None:
    """Sample standard deviation (None for fewer than 2 values)."""
    return statistics.stdev(values) if len(values) >= 2 else None


def seed_spreads(results: dict, best: dict) -> dict:
    """{method: {"test_loss": sd, "accuracy": sd (points), "seeds": n}} over the seeds at its chosen LR."""
    out = {}
    for name, b in best.items():
        losses = seed_values(results, name, b["lr"], lambda r: r["test_loss"])
        accs = seed_values(results, name, b["lr"], lambda r: 100 * r["accuracy"]["accuracy"])
        if len(losses) >= 2:
            out[name] = {"test_loss": spread(losses), "accuracy": spread(accs), "seeds": len(losses)}
    return out
