"""`svdkit finetune`: options → :class:`svdkit.training.finetune.FinetuneConfig` (no logic here)."""

from __future__ import annotations

import sys
from pathlib import Path

from svdkit.cli.options import add_field_options

HELP = "fine-tune a model with a spectral method (defaults: PiSSA on the default model and data)"

# finetune options that map one-to-one onto FinetuneConfig fields (None: keep the config's value): type, help
_FT_FIELDS = {
    "model": (str, "'default', a local Hugging Face folder, or a .gguf file"),
    "data": (str, "a named dataset (default = chatterbot, lee) or a JSONL file"),
    "method": (str, "method name, see `svdkit methods`"),
    "rank": (int, "adapter rank"),
    "steps": (int, "optimizer steps"),
    "lr": (float, "peak learning rate"),
    "batch_size": (int, "examples per optimizer step, across all ranks"),
    "grad_accum": (int, "micro-batches per step"),
    "max_length": (int, "drop examples longer than this many tokens"),
    "eval_every": (int, "held-out evaluation every N steps"),
    "checkpoint_every": (int, "checkpoint every N steps"),
    "seed": (int, "seed of the split, the batch order and the init"),
    "weight_decay": (float, "AdamW weight decay"),
    "warmup": (int, "linear warm-up steps"),
    "max_grad_norm": (float, "gradient clipping norm"),
    "heldout_fraction": (float, "fraction of the examples held out"),
    "max_heldout": (int, "held-out examples evaluated"),
    "samples": (int, "held-out prompts generated before and after"),
    "calibration_data": (str, "data-aware methods (corda, eva, lora-one, ...): named dataset or JSONL file to calibrate on"),
    "calibration_samples": (int, "data-aware methods: calibration examples"),
    "calibration_file": (str, "data-aware methods: reuse a run's saved calibration.safetensors"),
    "optimizer": (str, "train with an optim method instead of AdamW, e.g. --method full --optimizer galore (see `svdkit methods --kind optim`)"),
    "monitor": (str, "'spectral': log per-layer spectral alignment and the adapter update's top σ, warn before a loss explosion"),
}
# options that go into the method's own config
_METHOD_FIELDS = {
    "svd": (str, "exact or randomized SVD"),
    "niter": (int, "randomized SVD power iterations"),
    "alpha": (float, "scaling numerator: s = alpha/rank"),
    "targets": (str, "all-linear, attention, mlp, or a regex of module names"),
    "dropout": (float, "dropout on the adapter input"),
}


def add_parser(sub) -> None:
    f = sub.add_parser("finetune", help=HELP)
    import dataclasses

    from svdkit.training.finetune import FinetuneConfig

    defaults = {fld.name: fld.default for fld in dataclasses.fields(FinetuneConfig)}
    shown = {"rank": "the method's", "lr": "the method's paper value", "weight_decay": "the method's", "warmup": "3%% of the steps",
             "calibration_data": "the training data", "calibration_samples": "the method's paper value",
             "calibration_file": "compute", "optimizer": "AdamW", "monitor": "off"}  # fmt: skip
    add_field_options(f, _FT_FIELDS, {**defaults, **shown})
    add_field_options(f, _METHOD_FIELDS, dict.fromkeys(_METHOD_FIELDS, "the method's"))
    f.add_argument("--merge", action="store_true", default=None, help="also write the merged model (Hugging Face folder)")
    f.add_argument("--skip-malformed", action="store_true", default=None, help="skip malformed JSONL lines (counted)")
    f.add_argument("--config", help="a run's config.json (or YAML) to start from; other options override it")
    f.add_argument("--out", default="runs/finetune", help="run folder (default runs/finetune)")
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint, with "
                   "the config saved there (options given here must agree with it)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out folder that svdkit wrote")
    f.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: this rank's GPU if there is one, else cpu)")
    f.add_argument("--continual", help="comma-separated tasks trained in sequence (dataset, .jsonl file, or NAME@GROUP, "
                   "e.g. default@food,default@science); --method defaults to sculpt here; --steps is per task; writes continual.json/.md with every "
                   "task's held-out loss after each task (forgetting), next to --continual-baselines")
    f.add_argument("--continual-baselines", default="full,lora", help="with --continual: methods run on the same "
                   "tasks for comparison, comma-separated, or 'none' (default: full,lora = plain sequential fine-tuning, LoRA)")


def finetune_config(args):
    import dataclasses

    from svdkit.training.finetune import CONFIG, FinetuneConfig

    saved = Path(args.out) / CONFIG
    if args.config:
        cfg = FinetuneConfig.from_file(args.config)
    elif args.resume and saved.is_file():  # the run folder holds its config: only typed options change it
        cfg = FinetuneConfig.from_file(saved)
    else:
        cfg = FinetuneConfig()
    changes = {k: getattr(args, k) for k in (*_FT_FIELDS, "merge", "skip_malformed") if getattr(args, k) is not None}
    options = {k: getattr(args, k) for k in _METHOD_FIELDS if getattr(args, k) is not None}
    if options:
        changes["method_options"] = {**cfg.method_options, **options}
    return dataclasses.replace(cfg, **changes)


def run(args) -> int:
    from svdkit.training.finetune import Interrupted, finetune

    if args.continual:
        return _continual(args, finetune_config(args))
    try:
        finetune(finetune_config(args), args.out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    except Interrupted as exc:
        print(f"svdkit: {exc}", file=sys.stderr)
        return 130
    return 0


def _continual(args, cfg) -> int:
    """`--continual T1,T2,…`: the method and each baseline trained through the tasks (svdkit.training.continual)."""
    from svdkit.training.continual import ContinualConfig, run_continual

    tasks = [s.strip() for s in args.continual.split(",") if s.strip()]
    baselines = [] if args.continual_baselines.strip() == "none" else \
        [b.strip() for b in args.continual_baselines.split(",") if b.strip()]  # fmt: skip
    method = args.method or (cfg.method if args.config else "sculpt")  # --continual without --method: Sculpting Subspaces
    ccfg = ContinualConfig(method=method, method_options=cfg.method_options, rank=cfg.rank, steps=cfg.steps,
                           batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup,
                           max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)  # fmt: skip
    run_continual(cfg.model, tasks, ccfg, args.out, baselines=baselines, max_length=cfg.max_length,
                  heldout_fraction=cfg.heldout_fraction, max_heldout=cfg.max_heldout, overwrite=args.overwrite)  # fmt: skip
    return 0
