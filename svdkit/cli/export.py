"""`svdkit export RUN_DIR --format peft|merged --out DIR [--rank R]`: options → :func:`svdkit.export_run`."""

from __future__ import annotations

HELP = "export a finetune run as a PEFT LoRA adapter (optionally truncated to a rank) or as merged weights"


def add_parser(sub) -> None:
    e = sub.add_parser("export", help=HELP)
    e.add_argument("run", help="a run folder written by `svdkit finetune --out DIR`")
    e.add_argument("--format", required=True, choices=["peft", "merged"], help="PEFT LoRA folder or merged Hugging Face folder")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--rank", type=int, help="peft only: export the best rank-R approximation of each update and "
                   "report the truncation error (needed for full-rank methods: SVFT, SALT, CLOVER, SoKA, …)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out folder written by svdkit")


def run(args) -> int:
    from svdkit.training.run_export import export_run

    summary = export_run(args.run, args.format, args.out, rank=args.rank, overwrite=args.overwrite)
    print(f"svdkit export: {summary['method']} run {args.run} -> {summary['out']} ({summary['format']})")
    t = summary["truncation"]
    if t:
        print(f"truncated to rank {t['rank']}: relative error ‖ΔW − ΔW_r‖/‖ΔW‖ mean {t['mean_relative_error']:.3g}, "
              f"max {t['max_relative_error']:.3g} over {len(t['layers'])} layers (per layer: {summary['out']}/truncation.json)")
    return 0
