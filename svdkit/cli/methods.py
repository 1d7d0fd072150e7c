"""`svdkit methods`: the registered methods of each family, one table per family."""

from __future__ import annotations

from svdkit.core.registry import KINDS, method_class, methods

HELP = "list the registered methods (every family)"


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help=HELP)
    p.add_argument("--kind", choices=KINDS, help="only this family (default: all)")


def _table(kind: str) -> str:
    cols = ("method", "basis", "trains", "trainable params / matrix", "PEFT export rank", "paper")
    if kind != "adapt":
        cols = ("method", "what it does", "paper")
    rows = [cols]
    for c in map(method_class, methods(kind)):
        rows.append((c.name, c.basis, c.trains, c.params, c.export_rank, c.paper) if kind == "adapt"
                    else (c.name, getattr(c, "summary", ""), c.paper))
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args) -> int:
    kinds = [args.kind] if args.kind else [k for k in KINDS if methods(k)]
    print("\n\n".join(f"== {kind} ==\n{_table(kind)}" for kind in kinds))
    return 0
