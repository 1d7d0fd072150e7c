"""`svdkit finetune`: fine-tune a model with a spectral method and leave behind everything a user wants
to look at (config, metrics, loss curve, held-out loss before/after, samples, adapter, PEFT export,
optionally the merged model). Resumable from atomic checkpoints; data-parallel under torchrun."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svdkit.adapters import api
from svdkit.training import data, report
from svdkit.training.batches import batch_at, collate, epoch_order, eval_loss, shard
from svdkit.core.registry import config, method_class
from svdkit.core.distributed import init_from_env, rank_and_world
from svdkit.adapters.export import export_peft
from svdkit.core.checkpoint import STATE, load_state, save_state
from svdkit.core.files import atomic_dir, mark, remove_output, write_text
from svdkit.core.models import load_model
from svdkit.adapters.saving import load_adapter, save_adapter
from svdkit.training.loop import data_splits, make_optimizer, rng_state, set_rng_state, split_schedule, train_step

CONFIG, METRICS, CHECKPOINT, BEFORE = "config.json", "metrics.jsonl", "checkpoint", "before.json"


class Interrupted(Exception):
    """Ctrl-C during training: a checkpoint was saved; the message says how to resume."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a run (re-runnable with ``svdkit finetune --config run/config.json``)."""

    model: str = "default"
    data: str = "default"
    method: str = "pissa"
    rank: int | None = None  # None: the method's own default rank (PiSSA: 16)
    method_options: dict = field(default_factory=dict)  # other fields of the method's config, e.g. {"svd": "randomized"}
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: the method's paper default (METHODS.md)
    weight_decay: float | None = None  # None: the method's default (0 for principal-component adapters)
    warmup: int | None = None  # None: 3% of the steps
    max_grad_norm: float = 1.0
    max_length: int = 128
    heldout_fraction: float = 0.1
    max_heldout: int = 64
    eval_every: int = 50
    checkpoint_every: int = 50
    samples: int = 3
    seed: int = 0
    skip_malformed: bool = False
    merge: bool = False
    # data-aware methods (CorDA, EVA, LoRA-One, …): where the calibration statistics come from
    calibration_data: str | None = None  # a named dataset or JSONL file; None: the training split of `data`
    calibration_samples: int | None = None  # None: the method's paper default
    calibration_file: str | None = None  # reuse statistics saved by an earlier run (its calibration.safetensors)
    # full-parameter training with low-rank gradients (--method full --optimizer galore): a kind="optim" method
    optimizer: str | None = None  # None: torch.optim.AdamW
    optimizer_options: dict = field(default_factory=dict)  # fields of the optimizer's config, e.g. {"rank": 64}
    monitor: str | None = None  # "spectral": log spectral alignment + adapter σ₁, warn before a loss explosion

    def __post_init__(self):
        method_class(self.method)  # unknown method: error with the nearest name
        for name in ("steps", "batch_size", "grad_accum", "max_length", "eval_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.calibration_samples is not None and self.calibration_samples <= 0:
            raise ValueError(f"calibration_samples must be positive, got {self.calibration_samples}.")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}.")
        if self.monitor not in (None, "spectral"):
            raise ValueError(f"monitor must be 'spectral' or unset, got {self.monitor!r}.")
        if self.optimizer is not None and self.optimizer_config().kind != "optim":
            raise ValueError(f"--optimizer {self.optimizer!r} is not an optimizer; see `svdkit methods --kind optim`.")

    def optimizer_config(self):
        """The optim method's config (None: plain AdamW)."""
        import svdkit.optim  # noqa: F401  (registers the optim methods)

        return None if self.optimizer is None else config(self.optimizer, **self.optimizer_options)

    def adapter_config(self):
        """The method's config: its own defaults for every option not set here (rank None: the method's)."""
        rank = {} if self.rank is None else {"rank": self.rank}
        return config(self.method, **rank, seed=self.seed, **self.method_options)

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else method_class(self.method).lr

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "FinetuneConfig":
        text = Path(path).read_text()
        values = json.loads(text) if str(path).endswith(".json") else _yaml(text)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}.")
        return cls(**values)


def _yaml(text: str) -> dict:
    import yaml

    return yaml.safe_load(text) or {}


def _prepare_out(out: Path, cfg: FinetuneConfig, resume: bool, overwrite: bool) -> None:
    """Create the run folder, or check that a resumed run has the same config (saying what differs)."""
    if resume:
        if not (out / CHECKPOINT).is_dir():
            raise FileNotFoundError(f"--resume: {out} has no checkpoint ({out / CHECKPOINT}); start without --resume.")
        if not (out / CHECKPOINT / STATE).is_file():
            raise ValueError(f"--resume: {out / CHECKPOINT} was written by an older svdkit (a pickled state.pt, which "
                             "svdkit no longer reads: unpickling can run code); start the run again without --resume.")  # fmt: skip
        saved = json.loads((out / CONFIG).read_text())
        diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"--resume: the checkpoint in {out} was made with a different config ({shown}).")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it or --resume to continue it.")
        remove_output(out)  # only a run folder svdkit wrote, never the current/home directory or their ancestors
    out.mkdir(parents=True, exist_ok=True)
    mark(out)
    write_text(out / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")


def _save_checkpoint(out: Path, net, loop) -> None:
    with atomic_dir(out / CHECKPOINT, overwrite=True) as tmp:
        save_adapter(net, tmp / "adapter")
        save_state(tmp, {"step": loop.step, "optimizer": loop.optimizer.state_dict(), "method": api.training_state(net),
                         "scheduler": loop.scheduler.state_dict(), "rng": rng_state()})  # tensors + JSON, no pickle


def _barrier():
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def finetune(
    cfg: FinetuneConfig, out: str | os.PathLike, *, resume=False, overwrite=False, device=None, progress=None, log=print
) -> dict:
    """Run (or resume) a fine-tuning run into ``out``; returns the summary dict also written to eval.json.

    ``device``: None picks this rank's GPU when there is one (``cuda:LOCAL_RANK``), else the CPU.
    """
    init_from_env()
    rank, world = rank_and_world()
    device = torch.device(device or _default_device())
    main = rank == 0
    out = Path(out)
    if main:
        _prepare_out(out, cfg, resume, overwrite)
    _barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tok = load_model(cfg.model)
    model.to(device)
    if tok is None:
        raise ValueError(f"model {cfg.model} has no tokenizer; finetune needs one to read the data.")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = data.load_examples(cfg.data, tok, max_length=cfg.max_length, skip_malformed=cfg.skip_malformed)
    train_items, heldout = data.split(examples, cfg.heldout_fraction, cfg.seed)
    heldout = heldout[: cfg.max_heldout]
    before = None  # the base model's evaluation and samples: rank 0 makes and reports them
    if resume:
        load_adapter(model, out / CHECKPOINT / "adapter")
        if main:
            before = json.loads((out / BEFORE).read_text())
    else:
        if main:
            before = {"eval": _evaluate(model, heldout, cfg, pad_id), "samples": report.generate(model, tok, heldout[: cfg.samples])}
            write_text(out / BEFORE, json.dumps(before, indent=2) + "\n")
        method_cfg = cfg.adapter_config()
        stats = _calibration(cfg, method_cfg, model, tok, train_items, out, main, pad_id, progress)
        api.adapt(model, method_cfg, calibration=stats, progress=progress if main else False)
    method = api.state(model).config
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else method.weight_decay
    warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.03 * cfg.steps))
    loop = make_optimizer(model, cfg.peak_lr, weight_decay, cfg.steps, warmup, optimizer=cfg.optimizer_config())
    if resume:
        state = load_state(out / CHECKPOINT)
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loop.step = state["step"]
        api.load_training_state(model, state.get("method", {}))  # AdaLoRA's EMAs and masks, VectorFit's frozen set
        if main:
            report.truncate_metrics(out / METRICS, loop.step)
    ddp = model
    if world > 1:  # the frozen buffers (A₀, B₀) are identical on every rank: nothing to broadcast
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    model.train()
    final_eval = _run_loop(cfg, out, model, ddp, loop, train_items, heldout, pad_id, main, progress)
    model.eval()
    if not main:
        _barrier()
        return {}
    summary = _finish(cfg, out, model, tok, heldout, before, final_eval, pad_id, log)
    _barrier()
    return summary


def _calibration(cfg, method_cfg, model, tok, train_items, out: Path, main: bool, pad_id: int, progress):
    """The statistics a data-aware method needs (None for the others), saved to the run folder.

    ``calibration_samples`` examples (seeded choice) of the calibration data, in batches of ``batch_size``
    sorted by length; under torchrun each rank measures an equal share and the statistics are reduced.
    """
    if not method_cfg.uses_calibration:
        return None
    from svdkit.core.calibration import Calibration, calibrate

    if cfg.calibration_file:
        return Calibration.load(cfg.calibration_file)
    items = train_items
    if cfg.calibration_data is not None:
        items = data.load_examples(cfg.calibration_data, tok, max_length=cfg.max_length, skip_malformed=cfg.skip_malformed)
    wanted = cfg.calibration_samples or method_class(cfg.method).calibration_samples
    rank, world = rank_and_world()
    chosen = [items[j] for j in epoch_order(len(items), 0, cfg.seed)[:wanted]]
    chosen = chosen[: len(chosen) // world * world]
    if not chosen:
        raise ValueError(f"the calibration data ({cfg.calibration_data or cfg.data}) has {len(items)} usable "
                         f"examples, too few for {world} rank(s); pass --calibration-data with more examples.")  # fmt: skip
    mine = sorted(shard(chosen, rank, world), key=lambda x: len(x["input_ids"]))
    batches = [collate(mine[i : i + cfg.batch_size], pad_id) for i in range(0, len(mine), cfg.batch_size)]
    stats = calibrate(model, batches, method_cfg, progress=progress if main else False)
    if main:
        stats.save(out / "calibration.safetensors")
    return stats


def _default_device() -> str:
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def _micro_batches(cfg, batch: list[dict], rank: int, world: int, pad_id: int) -> list[dict]:
    """This rank's share of a global batch, split into ≤ grad_accum micro-batches.

    A short last batch of an epoch can leave a rank with nothing; it then runs one fully masked example
    (zero loss, zero gradient) so that every rank joins DDP's gradient all-reduce.
    """
    mine = shard(batch, rank, world)
    if not mine:
        mine = [dict(batch[0], labels=[data.IGNORE] * len(batch[0]["labels"]))]
    micro = -(-len(mine) // cfg.grad_accum)
    return [collate(mine[i : i + micro], pad_id) for i in range(0, len(mine), micro)]


def _evaluate(model, items, cfg, pad_id) -> dict:
    loss, ppl = eval_loss(model, items, cfg.batch_size, pad_id)
    return {"loss": loss, "perplexity": ppl}


def _run_loop(cfg, out, net, ddp, loop, train_items, heldout, pad_id, main, progress) -> dict | None:
    """Train to ``cfg.steps``; returns the held-out evaluation made after the last step (rank 0), if any."""
    from tqdm.auto import tqdm

    rank, world = rank_and_world()
    evaluation = None
    bar = tqdm(total=cfg.steps, initial=loop.step, desc="svdkit finetune", unit="step",
               disable=(not main) if progress is None else not (progress and main))  # fmt: skip
    monitor = None
    splits, schedule = data_splits(net, train_items, cfg.seed), split_schedule(net, loop.step)
    if cfg.monitor == "spectral" and main:  # forward hooks; each step's record joins metrics.jsonl
        from svdkit.inspection.monitor import SpectralMonitor

        monitor = SpectralMonitor(net, log=tqdm.write)
    try:
        while loop.step < cfg.steps:
            split, index = next(schedule)  # two-split methods (BiLoRA) alternate D₁ and D₂ batches
            mbs = _micro_batches(cfg, batch_at(splits[split], index, cfg.batch_size, cfg.seed), rank, world, pad_id)
            start = time.perf_counter()
            row = train_step(net, ddp, mbs, loop, max_grad_norm=cfg.max_grad_norm, peak_lr=cfg.peak_lr, total=cfg.steps,
                             split=split)  # fmt: skip
            seconds = time.perf_counter() - start
            row.update(step_s=round(seconds, 3), tokens_per_s=round(row.pop("tokens") / seconds, 1))
            row.update({"split": split} if len(splits) > 1 else {})  # which split's batch the loss is on
            row.update(monitor.after_step(loop.step) if monitor else {})
            if loop.step % cfg.eval_every == 0 or loop.step == cfg.steps:
                if main:
                    evaluation = _evaluate(net, heldout, cfg, pad_id)
                    row["heldout_loss"] = evaluation["loss"]
                net.train()
            if main:
                report.append_metrics(out / METRICS, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
                bar.update(1)
            if loop.step % cfg.checkpoint_every == 0 and loop.step < cfg.steps:
                if main:
                    _save_checkpoint(out, net, loop)
                _barrier()
    except KeyboardInterrupt:
        if main:
            _save_checkpoint(out, net, loop)
        raise Interrupted(f"interrupted at step {loop.step}/{cfg.steps}; a checkpoint was saved. "
                          f"Resume with: svdkit finetune --out {out} --resume") from None  # fmt: skip
    finally:
        bar.close()
        if monitor:
            monitor.close()
    if main:
        _save_checkpoint(out, net, loop)
    return evaluation if loop.step == cfg.steps else None


def _finish(cfg, out, model, tok, heldout, before, final_eval, pad_id, log) -> dict:
    after = {"eval": final_eval or _evaluate(model, heldout, cfg, pad_id),
             "samples": report.generate(model, tok, heldout[: cfg.samples])}  # fmt: skip
    save_adapter(model, out / "adapter", overwrite=True)
    peft = api.state(model).config.exports_lora  # full-rank updates (SVFT, CLIP-SVD, …) ship merged only
    if peft:
        export_peft(model, out / "peft", overwrite=True)
    summary = {"method": cfg.method, "rank": api.state(model).config.rank, "steps": cfg.steps, "lr": cfg.peak_lr,
               "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "heldout_examples": len(heldout), "before": before["eval"], "after": after["eval"],
               "train": report.train_stats(report.read_metrics(out / METRICS))}  # fmt: skip
    write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    report.write_samples(out / "samples.md", heldout[: cfg.samples], tok, before["samples"], after["samples"])
    report.plot_losses(out / METRICS, out / "loss.png", before["eval"]["loss"])
    if cfg.merge:
        api.merge(model)
        with atomic_dir(out / "merged", overwrite=True) as tmp:
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
    log(report.summary_text(out, summary, cfg.merge, peft))
    return summary
