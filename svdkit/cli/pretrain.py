"""`svdkit pretrain`: options → :class:`svdkit.training.pretrain.PretrainConfig` (no logic here)."""

from __future__ import annotations

import sys

from svdkit.cli.options import add_field_options

HELP = "train a small Llama from scratch on offline English text with a (low-rank-gradient) optimizer"

_FIELDS = {
    "optimizer": (str, "an optim method (`svdkit methods --kind optim`) or an adapter method (lora) for low-rank training"),
    "size": (str, "test (seconds) or bench (the benchmark model)"),
    "steps": (int, "optimizer steps"),
    "batch_size": (int, "sequences per step"),
    "seq_len": (int, "tokens per sequence"),
    "lr": (float, "peak learning rate"),
    "rank": (int, "low-rank methods: rank"),
    "update_gap": (int, "GaLore family: steps between subspace refreshes"),
    "eval_every": (int, "held-out evaluation every N steps"),
    "checkpoint_every": (int, "checkpoint every N steps"),
    "seed": (int, "seed of the model init and the batch order"),
    "cache": (str, "corpus cache folder"),
}
# fields of the optimizer's own config
_OPTIM_FIELDS = {
    "projection": (str, "GaLore family: svd, randomized, dct, online-pca or random"),
    "on_switch": (str, "GaLore family: keep, reset or rotate the moments at a refresh"),
    "scale": (float, "GaLore family: update scale alpha"),
    "residual_density": (float, "galore-plus: fraction of each matrix's entries in the sparse moment residual (0: off)"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help=HELP)
    shown = {"optimizer": "adamw", "size": "test", "steps": "the tier's", "batch_size": "the tier's", "seq_len": "the tier's",
             "lr": "the optimizer's", "rank": "hidden/4", "update_gap": "steps/10", "eval_every": "steps/5",
             "checkpoint_every": "eval_every", "seed": 0, "cache": "~/.cache/svdkit/pretrain"}  # fmt: skip
    add_field_options(p, _FIELDS, shown)
    add_field_options(p, _OPTIM_FIELDS, dict.fromkeys(_OPTIM_FIELDS, "the optimizer's"))
    p.add_argument("--config", help="a run's config.json to start from; other options override it")
    p.add_argument("--out", default="runs/pretrain", help="run folder (default runs/pretrain)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def pretrain_config(args):
    import dataclasses

    from svdkit.training.pretrain import PretrainConfig

    cfg = PretrainConfig.from_file(args.config) if args.config else PretrainConfig()
    changes = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    options = {k: getattr(args, k) for k in _OPTIM_FIELDS if getattr(args, k) is not None}
    if options:
        changes["optimizer_options"] = {**cfg.optimizer_options, **options}
    return dataclasses.replace(cfg, **changes)


def run(args) -> int:
    from svdkit.training.pretrain import pretrain

    try:
        pretrain(pretrain_config(args), args.out, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt as exc:
        print(f"svdkit: {exc}", file=sys.stderr)
        return 130
    return 0
