"""The `svdkit bench` subcommand: options → :func:`svdkit.benchmarking.bench` (no logic here)."""

from __future__ import annotations

import dataclasses

HELP = "compare methods side by side (LR sweep each, matched budget, full FT reference)"

# bench options that map one-to-one onto BenchConfig fields: type, help
_FIELDS = {
    "model": (str, "'default', a local Hugging Face folder, or a .gguf file"),
    "rank": (int, "LoRA's rank: the trainable-parameter budget the other methods match"),
    "steps": (int, "optimizer steps per run"),
    "batch_size": (int, "examples per step"),
    "eval_every": (int, "held-out evaluation every N steps"),
    "lr_points": (int, "learning rates per method (log grid centred on its paper LR, at least 3)"),
    "lr_ratio": (float, "ratio between neighbouring learning rates"),
    "seed": (int, "seed of the init and the batch order"),
    "noise_seeds": (int, "seeds the top methods and LoRA run at their best LR (seed-to-seed noise)"),
    "top": (int, "how many top methods are re-run with more seeds"),
    "svd": (str, "exact or randomized SVD for the truncated-SVD methods"),
    "accuracy": (str, "bigbench (downloads the bigbench 1.0.0 sdist once) or generated (offline)"),
    "per_task": (int, "BIG-bench questions per arithmetic subtask"),
    "lr_extend": (int, "LR points added past an edge of a method's sweep, at most, per side"),
    "claim_seeds": (int, "seeds per claim arm with --claims (at least 3)"),
}


def add_parser(sub) -> None:
    from svdkit.benchmarking.grid import BenchConfig
    from svdkit.cli.options import add_field_options

    defaults = {f.name: f.default for f in dataclasses.fields(BenchConfig)}
    b = sub.add_parser("bench", help=HELP)
    b.add_argument("--methods", help="comma-separated method names (default: every registered method; --quick: "
                   "lora,pissa,svfit,full)")  # fmt: skip
    add_field_options(b, _FIELDS, defaults)
    b.add_argument("--quick", action="store_true", help="4 methods, 10 steps, 32 questions: under 5 minutes")
    b.add_argument("--claims", action="store_true", help="run the papers' claims instead of the grid: each at "
                   "its paper configuration, 3 seeds, 40 steps, with a verdict by a stated rule")  # fmt: skip
    b.add_argument("--out", default="runs/bench", help="bench folder; finished runs in it are not recomputed (default runs/bench)")
    b.add_argument("--fresh", action="store_true", help="delete --out (a bench folder svdkit wrote) first and start over")


def run(args) -> int:
    from svdkit.benchmarking import bench

    options = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    if args.methods:
        options["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.claims:
        options["claims"] = True
    bench(args.out, quick=args.quick, fresh=args.fresh, **options)
    return 0
