"""A bench cell's spec and what the grid's results say: each method's best LR and the seed-to-seed spread."""

from __future__ import annotations

import math


def cell(method: str, options: dict, lr: float, seed: int, label: str | None = None, measure=()) -> dict:
    label = label or method
    return {"id": f"{label}/lr{lr:.2e}/s{seed}", "label": label, "method": method, "options": options,
            "lr": lr, "seed": seed, "measure": sorted(measure)}  # fmt: skip


def _grid_seed(results: dict) -> int:
    return min((r["cell"]["seed"] for r in results.values()), default=0)


def best_by_method(results: dict, info: dict) -> dict:
    """{method: {"lr", "best_heldout", "result", "sweep": {lr: loss}}} over the grid seed's LR sweep."""
    seed, out = _grid_seed(results), {}
    for r in results.values():
        c = r["cell"]
        if c["label"] not in info or c["seed"] != seed or "skipped" in r:
            continue
        entry = out.setdefault(c["label"], {"lr": None, "best_heldout": math.inf, "result": None, "sweep": {}})
        entry["sweep"][c["lr"]] = r["best_heldout"]
        if entry["result"] is None or r["best_heldout"] < entry["best_heldout"]:
            entry.update(lr=c["lr"], best_heldout=r["best_heldout"], result=r)
    return out


def seed_spreads(results: dict, best: dict) -> dict:
    """{method: max − min best held-out loss over the seeds run at its best LR} (methods with ≥ 2 seeds)."""
    spreads = {}
    for name, b in best.items():
        losses = [r["best_heldout"] for r in results.values() if r["cell"]["label"] == name
                  and r["cell"]["lr"] == b["lr"] and "skipped" not in r]  # fmt: skip
        if len(losses) >= 2:
            spreads[name] = max(losses) - min(losses)
    return spreads
