"""`svdkit bench`: every method side by side at a matched budget, each with its own LR sweep, on generated
arithmetic word problems, scored on BIG-bench arithmetic, with the papers' claims checked.

    svdkit.bench("runs/bench")                        # the full grid (≈ 30 min on 2 CPU cores)
    svdkit.bench("runs/bench-quick", quick=True)      # 4 methods, < 5 min
    svdkit.bench("runs/b", methods=["lora", "pissa"], steps=40)
    svdkit.bench("runs/claims", claims=True)          # the papers' claims: 3 seeds, 40 steps, paper configs

Files: grid.py (plan + resumable runner), cell.py (one method's runs in a fresh process), arithmetic.py
(the generator), bigbench.py (download/cache/read + exact match), report.py (report.md, curves.png),
claims.py (the claim checks), diagnose.py (memory, intruder dimensions).
"""

from __future__ import annotations


def bench(out="runs/bench", *, quick=False, fresh=False, progress=None, log=print, processes=True, **options) -> dict:
    """Run (or resume) a bench into ``out``; ``options`` are :class:`svdkit.benchmarking.grid.BenchConfig` fields
    (``claims=True``: the claims suite, :meth:`BenchConfig.claims_suite`'s defaults under the given options).
    ``processes=False`` runs every cell in this process. Returns the summary (also in ``out/summary.json``)."""
    from svdkit.benchmarking.grid import BenchConfig, run

    if "methods" in options and options["methods"] is not None:
        options["methods"] = tuple(options["methods"])
    if options.get("claims"):
        cfg = BenchConfig.claims_suite(**options)
    else:
        cfg = BenchConfig.quick(**options) if quick else BenchConfig(**options)
    return run(cfg, out, fresh=fresh, progress=progress, log=log, processes=processes)
