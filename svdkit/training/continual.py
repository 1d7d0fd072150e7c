"""Continual fine-tuning: train on tasks in sequence and measure forgetting after each one.

    tasks = [Task("ai", train_ai, heldout_ai), Task("food", train_food, heldout_food)]
    result = svdkit.continual(model, tasks, ContinualConfig(method="sculpt", steps=50), pad_id=tok.pad_token_id)
    result["losses"][i][j]     # held-out loss of task j after training task i (row 0: before any training)

One adapter is installed once and trained through every task (a fresh AdamW with warm-up + cosine per task,
svdkit's training step), so "sequential fine-tuning" is ``method="full"``, sequential LoRA is ``"lora"``
and Sculpting Subspaces is ``"sculpt"``; between tasks the methods' ``after_task`` hooks run
(:func:`svdkit.adapters.api.after_task`: Sculpt recomputes the protected subspaces).

Forgetting of task j (reported per task and averaged over all but the last): its held-out loss after the
last task minus its loss right after its own training (positive = forgot); the "backward transfer" of
GEM (Lopez-Paz & Ranzato 2017) with losses in place of accuracies and the sign flipped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from svdkit.adapters import api
from svdkit.core.registry import config, method_class
from svdkit.training.batches import batch_at, collate, eval_loss
from svdkit.training.loop import make_optimizer, train_step


@dataclass
class Task:
    """A named task: training items and held-out items (examples of :mod:`svdkit.training.data`)."""

    name: str
    train: list
    heldout: list


@dataclass(frozen=True)
class ContinualConfig:
    """One continual run: the method (any adapt method; ``full`` = plain sequential fine-tuning), the
    optimizer steps *per task*, and the usual training options (None: the method's defaults)."""

    method: str = "sculpt"
    method_options: dict = field(default_factory=dict)
    rank: int | None = None
    steps: int = 50
    batch_size: int = 8
    lr: float | None = None
    weight_decay: float | None = None
    warmup: int | None = None  # None: 3% of each task's steps (at least 1)
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        method_class(self.method)  # an unknown name fails here, with the nearest one
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ContinualConfig: {name} must be positive, got {getattr(self, name)}.")

    def adapter_config(self):
        rank = {} if self.rank is None or not method_class(self.method).uses_rank else {"rank": self.rank}
        return config(self.method, **rank, seed=self.seed, **self.method_options)


def continual(model, tasks: Sequence[Task], cfg: ContinualConfig, *, pad_id: int, eval_batch_size: int = 8,
              progress=None) -> dict:  # fmt: skip
    """Adapt ``model`` with ``cfg``'s method and train on ``tasks`` in order; returns ``{"method", "tasks",
    "losses", "forgetting", "mean_forgetting", "final_mean_loss"}`` (losses[i][j]: task j's held-out loss
    after i tasks; row 0 is the model before training). ``model`` is modified (adapted and trained)."""
    from tqdm.auto import tqdm

    if not tasks:
        raise ValueError("continual needs at least one task.")
    for t in tasks:
        if not t.train or not t.heldout:
            raise ValueError(f"task {t.name!r} has {len(t.train)} training and {len(t.heldout)} held-out examples; "
                             "each task needs both.")  # fmt: skip
    method = cfg.adapter_config()
    api.adapt(model, method, progress=False)
    lr = cfg.lr if cfg.lr is not None else type(method).lr
    wd = cfg.weight_decay if cfg.weight_decay is not None else method.weight_decay
    warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.03 * cfg.steps))

    def evaluate() -> list[float]:
        return [eval_loss(model, t.heldout, eval_batch_size, pad_id)[0] for t in tasks]

    losses = [evaluate()]
    bar = tqdm(total=cfg.steps * len(tasks), desc=f"svdkit continual ({cfg.method})", unit="step",
               disable=not progress if progress is not None else None)  # fmt: skip
    model.train()
    try:
        for task in tasks:
            loop = make_optimizer(model, lr, wd, cfg.steps, warmup)
            for step in range(cfg.steps):
                batch = collate(batch_at(task.train, step, cfg.batch_size, cfg.seed), pad_id)
                row = train_step(model, model, [batch], loop, max_grad_norm=cfg.max_grad_norm, peak_lr=lr, total=cfg.steps)
                bar.set_postfix(task=task.name, loss=f"{row['loss']:.3f}")
                bar.update(1)
            api.after_task(model)
            losses.append(evaluate())
            model.train()
    finally:
        bar.close()
        model.eval()
    forgetting = [losses[-1][j] - losses[j + 1][j] for j in range(len(tasks))]
    earlier = forgetting[:-1]
    return {"method": cfg.method, "tasks": [t.name for t in tasks], "losses": losses, "forgetting": forgetting,
            "mean_forgetting": sum(earlier) / len(earlier) if earlier else 0.0,
            "final_mean_loss": sum(losses[-1]) / len(tasks)}  # fmt: skip


def load_task(spec: str, tok, *, max_length: int = 128, heldout_fraction: float = 0.1, max_heldout: int = 64,
              seed: int = 0, skip_malformed: bool = False) -> Task:  # fmt: skip
    """A task from ``NAME`` (a dataset name or .jsonl file) or ``NAME@GROUP`` (only its examples whose
    ``group`` is GROUP, e.g. ``default@food``: a chatterbot topic); split into train/held-out by ``seed``."""
    from svdkit.training import data

    source, _, group = spec.partition("@")
    examples = data.load_examples(source, tok, max_length=max_length, skip_malformed=skip_malformed)
    items = list(examples.items)
    if group:
        groups = sorted({x.get("group") for x in items if x.get("group")})
        items = [x for x in items if x.get("group") == group]
        if not items:
            raise ValueError(f"task {spec!r}: {source} has no examples of group {group!r}; its groups: "
                             f"{', '.join(groups) or 'none (its examples carry no group)'}.")  # fmt: skip
    train, heldout = data.split(items, heldout_fraction, seed)
    return Task(spec, train, heldout[:max_heldout])


def table(results: Sequence[dict]) -> str:
    """A markdown table: per method, the held-out loss of every task after each task, and the forgetting."""
    names = results[0]["tasks"]
    lines = ["| method | after | " + " | ".join(names) + " | mean |", "|---|---|" + "---:|" * (len(names) + 1)]
    for r in results:
        for i, row in enumerate(r["losses"]):
            after = "base" if i == 0 else names[i - 1]
            cells = " | ".join(f"{v:.4f}" for v in row)
            lines.append(f"| {r['method']} | {after} | {cells} | {sum(row) / len(row):.4f} |")
        lines.append(f"| {r['method']} | forgetting | " + " | ".join(f"{v:+.4f}" for v in r["forgetting"])
                     + f" | {r['mean_forgetting']:+.4f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def run_continual(model_name: str, specs: Sequence[str], cfg: ContinualConfig, out: str | os.PathLike, *,
                  baselines: Sequence[str] = ("full", "lora"), max_length: int = 128, heldout_fraction: float = 0.1,
                  max_heldout: int = 64, overwrite: bool = False, log=print) -> list[dict]:  # fmt: skip
    """`svdkit finetune --continual`: ``cfg``'s method and each baseline method (same tasks, steps and seed;
    the baselines at their own default learning rates) from a freshly loaded model each; writes
    ``continual.json`` and ``continual.md`` to ``out`` atomically and returns the results."""
    from svdkit.core.files import atomic_dir, write_text
    from svdkit.core.models import load_model

    out = Path(out)
    results = []
    for method in dict.fromkeys([cfg.method, *baselines]):
        model, tok = load_model(model_name)
        if tok is None:
            raise ValueError(f"model {model_name} has no tokenizer; continual fine-tuning needs one to read the data.")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        tasks = [load_task(s, tok, max_length=max_length, heldout_fraction=heldout_fraction,
                           max_heldout=max_heldout, seed=cfg.seed) for s in specs]  # fmt: skip
        mine = cfg if method == cfg.method else dataclasses.replace(cfg, method=method, method_options={}, lr=None)
        results.append(continual(model, tasks, mine, pad_id=pad_id))
    text = table(results)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_text(tmp / "continual.json", json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=2) + "\n")
        write_text(tmp / "continual.md", text)
    log(text)
    return results
