"""The `svdkit` command line. Each subcommand maps its options onto library calls; no logic lives here."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import method_class, methods


def _methods_table() -> str:
    cols = ("method", "basis", "trains", "trainable params / matrix", "PEFT export rank", "paper")
    rows = [cols] + [
        (c.name, c.basis, c.trains, c.params, c.export_rank, c.paper) for c in map(method_class, methods())
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="svdkit", description="Spectral (SVD-based) adaptation of pretrained models.")
    p.add_argument("--version", action="version", version=f"svdkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the registered methods")
    d = sub.add_parser("demo", help="adapt the default model, check the function, train a few steps, save, export, merge")
    d.add_argument("--model", default="default", help="'default', a local Hugging Face folder, or a .gguf file")
    d.add_argument("--method", default="pissa", choices=methods())
    d.add_argument("--rank", type=int, default=16)
    d.add_argument("--svd", default="exact", choices=["exact", "randomized"])
    d.add_argument("--targets", default="all-linear", help="preset (all-linear, attention, mlp) or regex")
    d.add_argument("--steps", type=int, default=5)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "methods":
            print(_methods_table())
            return 0
        from .demo import run_demo

        report = run_demo(
            args.out, model=args.model, method=args.method, rank=args.rank, svd=args.svd,
            targets=args.targets, steps=args.steps, overwrite=args.overwrite,
        )  # fmt: skip
        return 0 if report["passed"] else 1
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, ImportError) as exc:
        print(f"svdkit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
