"""Held-out loss of the default model right after `adapt`, before any training, for the methods whose init
changes the function by design (issue 12: no default may leave the model worse than the base).

The loss is the bench's validation split (32 generated arithmetic problems, seed 0). A single run: the
numbers are deterministic (seeded inits), only the times vary.

    .venv/bin/python -P benchmarks/init_loss.py     # writes benchmarks/results/init_loss.md (-P: benchmarks/inspect.py
                                                    # would shadow the standard library's inspect)
"""

from __future__ import annotations

import time
from pathlib import Path

import svdkit
from svdkit.benchmarking import arithmetic
from svdkit.training.batches import eval_loss

CASES = [
    ("nlora", {}), ("nlora", {"preserve_init": False}), ("nlora", {"preserve_init": False, "nystrom_core": "pinv"}),
    ("inttune", {}), ("inttune", {"preserve_init": False}), ("svft", {}), ("svft", {"init": "zero"}),
    ("kasa", {"rank": 8}), ("kasa", {"rank": 8, "truncate": "paper"}), ("kasa", {}), ("kasa", {"truncate": "paper"}),
]  # fmt: skip


def main() -> None:
    model, tok = svdkit.load_model("default")
    items = arithmetic.examples(tok, arithmetic.generate(32, seed=0))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [("base", "—", eval_loss(model, items, 64, pad)[0], 0.0)]
    print(f"base: {rows[0][2]:.3f}", flush=True)
    for name, options in CASES:
        start = time.perf_counter()
        svdkit.adapt(model, svdkit.config(name, **options), progress=False)
        loss = eval_loss(model, items, 64, pad)[0]
        svdkit.unadapt(model)
        rows.append((name, str(options or "defaults"), loss, time.perf_counter() - start))
        print(f"{name} {options}: {loss:.3f}", flush=True)
    lines = ["| method | options | held-out loss at init | adapt + eval s |", "|---|---|---|---|"]
    lines += [f"| {n} | {o} | {loss:.3f} | {t:.0f} |" for n, o, loss, t in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(__file__).parent / "results" / "init_loss.md"
    out.write_text("Held-out loss at init on the default model (`benchmarks/init_loss.py`, single run)\n\n" + table)


if __name__ == "__main__":
    main()
