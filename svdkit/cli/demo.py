"""`svdkit demo`: the quick adapt / check / train / save / export / merge round trip."""

from __future__ import annotations

from svdkit.core.registry import methods

HELP = "adapt the default model, check the function, train a few steps, save, export, merge"


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help=HELP)
    d.add_argument("--model", default="default", help="'default', a local Hugging Face folder, or a .gguf file")
    d.add_argument("--method", default="pissa", choices=methods())
    d.add_argument("--rank", type=int, default=16)
    d.add_argument("--svd", default="exact", choices=["exact", "randomized"])
    d.add_argument("--targets", default="all-linear", help="preset (all-linear, attention, mlp) or regex")
    d.add_argument("--steps", type=int, default=5)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out folder that svdkit wrote")


def run(args) -> int:
    from svdkit.adapters.demo import run_demo

    report = run_demo(
        args.out, model=args.model, method=args.method, rank=args.rank, svd=args.svd,
        targets=args.targets, steps=args.steps, overwrite=args.overwrite,
    )  # fmt: skip
    return 0 if report["passed"] else 1
