"""The papers' headline claims, checked at small scale on the bench's own runs.

Each claim adds the cells it needs to the plan (:func:`extra_cells`) and reads a verdict off the results
(:func:`verdicts`): "holds", "does not hold", "inconclusive at this scale" (a difference inside the
seed-to-seed noise, or no signal), or "not run" (a method the claim needs is not in this bench).

1. PiSSA converges faster than LoRA at the same rank and LR (https://arxiv.org/abs/2404.02948): PiSSA
   at LoRA's LR and rank vs LoRA, held-out loss at every evaluation.
2. MiLoRA (https://arxiv.org/abs/2406.09044) and CorDA-KPA (https://arxiv.org/abs/2406.05223) preserve
   more of the base model's held-out perplexity than PiSSA: perplexity on gensim lee_background (plain
   English news, unrelated to the arithmetic training data) after training at each method's paper LR.
3. SVFT (https://arxiv.org/abs/2405.19597) / SVFit reach a loss comparable to LoRA's (within 0.05 nats
   of LoRA's best held-out loss) with ≤ 1/10 of its trainable parameters.
4. EVA's rank redistribution (https://arxiv.org/abs/2410.07170) beats uniform ranks at the same budget:
   EVA (rho=2) vs EVA with rho=1 (uniform ranks, the paper's ablation) at its paper LR.
5. LoRA creates more intruder dimensions than full fine-tuning (https://arxiv.org/abs/2410.21228): top-10
   left singular vectors, ε = 0.5, over evenly spaced target matrices, at each method's paper LR.
"""

from __future__ import annotations

from svdkit.benchmarking.results import best_by_method, cell

COMPARABLE_NATS = 0.05
FEWER = 0.1


def _center(info: dict, name: str) -> float:
    lrs = info[name]["lrs"]
    return lrs[len(lrs) // 2]


def _find(cells: list[dict], label: str, lr: float) -> dict | None:
    return next((c for c in cells if c["label"] == label and c["lr"] == lr), None)


def extra_cells(bench, info: dict, cells: list[dict]) -> list[dict]:
    """The grid's cells with the claims' measurements switched on, plus the claims' own variants."""

    cells = [dict(c) for c in cells]

    def measure(label, what):
        if label in info:
            c = _find(cells, label, _center(info, label))
            c["measure"] = sorted(set(c["measure"]) | {what})

    for name in ("pissa", "milora"):
        measure(name, "lee")
    for name in ("lora", "full"):
        measure(name, "intruders")
    seed = bench.seed
    if "pissa" in info and "lora" in info:
        opts = {**info["pissa"]["options"], "rank": info["lora"]["options"]["rank"]}
        cells.append(cell("pissa", opts, _center(info, "lora"), seed, "pissa-at-lora-lr"))
    if "corda" in info:
        cells.append(cell("corda", {**info["corda"]["options"], "mode": "kpa"}, _center(info, "corda"), seed,
                          "corda-kpa", ("lee",)))  # fmt: skip
    if "eva" in info:
        cells.append(cell("eva", {**info["eva"]["options"], "rho": 1}, _center(info, "eva"), seed, "eva-uniform"))
    return cells


def _result(results: dict, cells: list[dict], label: str, lr: float | None) -> dict | None:
    for c in cells:
        if c["label"] == label and (lr is None or c["lr"] == lr) and c["id"] in results:
            r = results[c["id"]]
            return None if "skipped" in r else r
    return None


def verdicts(plan: dict, results: dict, noise: float | None) -> list[dict]:
    """[{"claim", "verdict", "evidence", "methods"}] for the five claims (see the module docstring)."""
    info, cells = plan["methods"], plan["cells"]
    center = lambda n: _center(info, n) if n in info else None  # noqa: E731
    tol = noise if noise is not None else 0.0
    rows = [_pissa_faster(results, cells, center, tol), _preserve(results, cells, center, "milora"),
            _preserve(results, cells, center, "corda-kpa"), _fewer(results, info, "svft"),
            _fewer(results, info, "svfit"), _eva(results, cells, center, tol), _intruders(results, cells, center)]  # fmt: skip
    return rows


def _row(claim, methods, verdict, evidence):
    return {"claim": claim, "methods": methods, "verdict": verdict, "evidence": evidence}


def _pissa_faster(results, cells, center, tol):
    claim = "PiSSA converges faster than LoRA (same rank and LR)"
    lora, pissa = _result(results, cells, "lora", center("lora")), _result(results, cells, "pissa-at-lora-lr", None)
    if not (lora and pissa):
        return _row(claim, "lora,pissa", "not run", "needs lora and pissa")
    pairs = [(s, a, b) for (s, a), (_, b) in zip(pissa["curve"], lora["curve"])]
    shown = ", ".join(f"step {s}: {a:.3f} vs {b:.3f}" for s, a, b in pairs)
    ahead, behind = [a < b - tol for _, a, b in pairs], [a > b + tol for _, a, b in pairs]
    verdict = "holds" if all(ahead) else ("does not hold" if any(behind) else "inconclusive at this scale")
    return _row(claim, "lora,pissa", verdict, f"held-out loss PiSSA vs LoRA at lr {center('lora'):g}: {shown} (noise {tol:.4f})")


def _preserve(results, cells, center, label):
    method = label.split("-")[0]
    claim = f"{label} preserves more base perplexity (lee_background) than PiSSA"
    base = _result(results, cells, "base", None)
    ours = _result(results, cells, label, center(method) if label == method else None)
    pissa = _result(results, cells, "pissa", center("pissa"))
    if not (base and ours and pissa and "lee_perplexity" in ours and "lee_perplexity" in pissa):
        return _row(claim, f"{method},pissa", "not run", f"needs {method} and pissa")
    b, a, p = base["lee_perplexity"], ours["lee_perplexity"], pissa["lee_perplexity"]
    verdict = "holds" if a - b < p - b else "does not hold"
    if abs((a - b) - (p - b)) < 0.01 * b:
        verdict = "inconclusive at this scale"
    return _row(claim, f"{method},pissa", verdict, f"perplexity base {b:.2f} → {label} {a:.2f}, PiSSA {p:.2f}")


def _best(results, info, name):

    best = best_by_method(results, info).get(name)
    return None if best is None else best["result"]


def _fewer(results, info, name):
    claim = f"{name} reaches LoRA's loss with far fewer parameters"
    ours, lora = _best(results, info, name), _best(results, info, "lora")
    if not (ours and lora):
        return _row(claim, f"{name},lora", "not run", f"needs {name} and lora")
    gap, ratio = ours["best_heldout"] - lora["best_heldout"], ours["params"] / lora["params"]
    few, close = ratio <= FEWER, gap <= COMPARABLE_NATS
    verdict = "holds" if few and close else "does not hold"
    return _row(claim, f"{name},lora", verdict, f"best held-out {ours['best_heldout']:.3f} vs LoRA {lora['best_heldout']:.3f} "
                f"(gap {gap:+.3f}, comparable ≤ {COMPARABLE_NATS}); params {ours['params']:,} = {ratio:.3f}× LoRA's")  # fmt: skip


def _eva(results, cells, center, tol):
    claim = "EVA's rank redistribution beats uniform ranks (same budget)"
    eva, uni = _result(results, cells, "eva", center("eva")), _result(results, cells, "eva-uniform", None)
    if not (eva and uni):
        return _row(claim, "eva", "not run", "needs eva (rho=2 and rho=1)")
    gap = uni["best_heldout"] - eva["best_heldout"]
    verdict = "inconclusive at this scale" if abs(gap) <= tol else ("holds" if gap > 0 else "does not hold")
    return _row(claim, "eva", verdict, f"best held-out rho=2 {eva['best_heldout']:.3f} vs rho=1 {uni['best_heldout']:.3f}, "
                f"params {eva['params']:,} vs {uni['params']:,}; noise {tol:.3f}")  # fmt: skip


def _intruders(results, cells, center):
    claim = "LoRA creates more intruder dimensions than full fine-tuning"
    lora, full = _result(results, cells, "lora", center("lora")), _result(results, cells, "full", center("full"))
    if not (lora and full and "intruders" in lora and "intruders" in full):
        return _row(claim, "lora,full", "not run", "needs lora and full")
    a, b = lora["intruders"], full["intruders"]
    verdict = "holds" if a["total"] > b["total"] else ("does not hold" if a["total"] < b["total"] else "inconclusive at this scale")
    return _row(claim, "lora,full", verdict, f"intruders (k=10, ε=0.5) over {a['layers']} matrices: LoRA {a['total']}, "
                f"full FT {b['total']}")  # fmt: skip
