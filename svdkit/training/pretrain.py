"""`svdkit pretrain`: a small Llama trained from scratch on offline English text with any registered optimizer
(kind="optim"), a parametrization (SST, LOST), or LoRA-style low-rank training (an adapter method name), through
the same training step, schedule, metrics, curves and atomic, resumable, pickle-free checkpoints as `svdkit finetune`.

Tiers (``size``): "test" (seconds: hidden 64, 2 layers, 30 steps of 8 × 64 tokens) and "bench" (hidden 128,
2 layers, 4 heads, SwiGLU 344, 150 steps of 8 × 64 tokens: a table of ~15 runs in ~15 minutes on one CPU thread). Both use a 4,096-entry byte-level BPE vocabulary trained
on the training split and tied input/output embeddings, so the block matrices (which low-rank optimizers act on)
are not outweighed by the embedding table. Low-rank defaults follow GaLore's protocol scaled down: rank = hidden/4,
refresh gap = steps/10 (at least 10 refreshes), 10% warm-up then cosine decay; every method sees the same
batches in the same order (seeded), and the held-out documents are never trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from svdkit.core.checkpoint import STATE, load_state, save_state
from svdkit.core.files import atomic_dir, write_text
from svdkit.core.registry import config, method_class
from svdkit.training import batches, corpus, report
from svdkit.training.loop import LoopState, cosine_with_warmup, rng_state, set_rng_state, train_step

SIZES = {
    "test": dict(hidden=64, layers=2, heads=4, ff=176, seq_len=64, batch_size=8, steps=30, chars_per_source=150_000, eval_blocks=32),
    "bench": dict(hidden=128, layers=2, heads=4, ff=344, seq_len=64, batch_size=8, steps=150, chars_per_source=3_000_000, eval_blocks=96),
}  # fmt: skip
VOCAB = 4096
CONFIG, METRICS, CHECKPOINT = "config.json", "metrics.jsonl", "checkpoint"


@dataclass(frozen=True)
class PretrainConfig:
    """A from-scratch run (re-runnable with ``svdkit pretrain --config run/config.json``)."""

    optimizer: str = "adamw"  # a kind="optim" method, or an adapter method name (e.g. "lora") for low-rank W0 + BA training
    optimizer_options: dict = field(default_factory=dict)  # fields of the method's config, e.g. {"projection": "dct"}
    size: str = "test"
    steps: int | None = None  # None: the tier's
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None  # None: the method's default (adamw/muon 1e-3, GaLore family 1e-2 with scale 0.25)
    rank: int | None = None  # low-rank methods: None = hidden / 4
    update_gap: int | None = None  # GaLore family: None = steps / 10
    warmup: float = 0.1  # fraction of the steps
    max_grad_norm: float = 1.0
    eval_every: int | None = None  # None: 5 evaluations
    checkpoint_every: int | None = None  # None: with the evaluations
    seed: int = 0
    cache: str | None = None  # corpus cache folder; None: ~/.cache/svdkit/pretrain
    sources: tuple = corpus.SOURCES  # text sources (svdkit.training.corpus.SOURCES)

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; sizes: {', '.join(SIZES)}.")
        object.__setattr__(self, "sources", tuple(self.sources))
        import svdkit.optim  # noqa: F401  (registers the optim methods)

        method_class(self.optimizer)
        for name in ("steps", "batch_size", "seq_len", "rank", "update_gap", "eval_every", "checkpoint_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")

    def tier(self) -> dict:
        t = dict(SIZES[self.size])
        for k in ("steps", "batch_size", "seq_len"):
            t[k] = getattr(self, k) or t[k]
        t["eval_every"] = self.eval_every or max(1, t["steps"] // 5)
        t["checkpoint_every"] = self.checkpoint_every or t["eval_every"]
        return t

    def method_config(self):
        """The optimizer (or adapter) config with the run's defaults for rank and refresh gap filled in."""
        t, cls = self.tier(), method_class(self.optimizer)
        names = {f.name for f in dataclasses.fields(cls)}
        opts = dict(self.optimizer_options)
        if "rank" in names and "rank" not in opts:
            opts["rank"] = self.rank or t["hidden"] // 4
        if "update_gap" in names and "update_gap" not in opts:
            opts["update_gap"] = self.update_gap or max(1, t["steps"] // 10)
        if "seed" in names:
            opts.setdefault("seed", self.seed)
        return config(self.optimizer, **opts)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "sources": list(self.sources)}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "PretrainConfig":
        values = json.loads(Path(path).read_text())
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {sorted(unknown)}.")
        return cls(**values)


def build_model(tier: dict, vocab: int, seed: int):
    """A Llama (RMSNorm, SwiGLU, RoPE) of the tier's shape with tied embeddings, seeded."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=tier["hidden"], intermediate_size=tier["ff"], num_hidden_layers=tier["layers"],
                         num_attention_heads=tier["heads"], num_key_value_heads=tier["heads"], vocab_size=vocab,
                         max_position_embeddings=tier["seq_len"], tie_word_embeddings=True)  # fmt: skip
    return tf.LlamaForCausalLM(cfg)


def make_training(model, cfg: PretrainConfig, total: int) -> LoopState:
    """Optimizer + schedule: an optim method through ``svdkit.optim.build`` (after ``parametrize`` for SST/LOST),
    or an adapter method (LoRA-style training: W = W0 + BA with W0 frozen, everything else trained fully)."""
    from svdkit import optim

    mcfg = cfg.method_config()
    if mcfg.kind == "optim":
        if getattr(mcfg, "parametrizes", False):
            optim.parametrize(model, mcfg)
        lr = cfg.lr if cfg.lr is not None else mcfg.default_lr
        opt = optim.build(model, mcfg, lr=lr)
    else:
        from svdkit.adapters import api

        api.adapt(model, mcfg, progress=False)
        in_layers = {id(p) for _, layer in api.adapted_layers(model) for p in layer.parameters()}
        for p in model.parameters():  # GaLore's LoRA baseline trains embeddings and norms fully
            if id(p) not in in_layers:
                p.requires_grad_(True)
        lr = cfg.lr if cfg.lr is not None else 1e-3
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, round(cfg.warmup * total))
    return LoopState(0, opt, torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, warmup)))


def _batch(blocks: torch.Tensor, step: int, batch_size: int, seed: int) -> dict:
    """Global batch ``step``: consecutive slices of a seeded per-epoch permutation of the blocks."""
    per_epoch = len(blocks) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(blocks)} training blocks are fewer than one batch of {batch_size}; use more text.")
    epoch, i = divmod(step, per_epoch)
    order = batches.epoch_order(len(blocks), epoch, seed)[i * batch_size : (i + 1) * batch_size]
    ids = blocks[order]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def evaluate(model, blocks: torch.Tensor, batch_size: int) -> dict:
    """Mean next-token loss (nats) and perplexity over the held-out blocks."""
    was, total, count = model.training, 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i : i + batch_size]
            loss, n = batches.token_loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
            total, count = total + float(loss), count + n
    model.train(was)
    mean = total / count
    return {"loss": mean, "perplexity": float(torch.tensor(mean).exp())}


def _save(out: Path, model, loop: LoopState) -> None:
    from safetensors.torch import save_model

    with atomic_dir(out / CHECKPOINT, overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        save_state(tmp, {"step": loop.step, "optimizer": loop.optimizer.state_dict(),
                         "scheduler": loop.scheduler.state_dict(), "rng": rng_state()})  # fmt: skip


def _prepare(out: Path, cfg: PretrainConfig, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / CHECKPOINT / STATE).is_file():
            raise FileNotFoundError(f"--resume: {out} has no checkpoint; start without --resume.")
        saved = json.loads((out / CONFIG).read_text())
        if saved != cfg.to_dict():
            diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if saved.get(k) != v}
            raise ValueError(f"--resume: {out} was made with a different config: {diff}.")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it or --resume to continue it.")
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")


def pretrain(cfg: PretrainConfig, out: str | os.PathLike, *, resume=False, overwrite=False, until: int | None = None,
             progress=None, log=print) -> dict | None:  # fmt: skip
    """Train (or resume) into ``out``; returns the summary also written to ``eval.json``. ``until``: stop after
    that step with a checkpoint and return None (a time-sliced run; continue it with ``resume=True``)."""
    from safetensors.torch import load_model
    from tqdm.auto import tqdm

    out, t = Path(out), cfg.tier()
    _prepare(out, cfg, resume, overwrite)
    cache = Path(cfg.cache or Path.home() / ".cache" / "svdkit" / "pretrain")
    text = corpus.build(cache, cfg.sources, chars_per_source=t["chars_per_source"], vocab_size=VOCAB)
    train_blocks = corpus.blocks(text["train"], t["seq_len"])
    held = corpus.blocks(text["heldout"], t["seq_len"])[: t["eval_blocks"]]
    random.seed(cfg.seed)
    model = build_model(t, VOCAB, cfg.seed)
    loop = make_training(model, cfg, t["steps"])
    if resume:
        load_model(model, str(out / CHECKPOINT / "model.safetensors"))
        state = load_state(out / CHECKPOINT)
        loop.optimizer.load_state_dict(state["optimizer"])
        loop.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loop.step = state["step"]
        report.truncate_metrics(out / METRICS, loop.step)
    model.train()
    bar = tqdm(total=t["steps"], initial=loop.step, desc=f"svdkit pretrain {cfg.optimizer}", unit="step",
               disable=not progress if progress is not None else None)  # fmt: skip
    evaluation = None
    try:
        while loop.step < min(t["steps"], until or t["steps"]):
            start = time.perf_counter()
            row = train_step(model, model, [_batch(train_blocks, loop.step, t["batch_size"], cfg.seed)], loop,
                             max_grad_norm=cfg.max_grad_norm, peak_lr=loop.scheduler.base_lrs[0], total=t["steps"])  # fmt: skip
            seconds = time.perf_counter() - start
            row.update(step_s=round(seconds, 4), tokens_per_s=round(row.pop("tokens") / seconds, 1))
            if loop.step % t["eval_every"] == 0 or loop.step == t["steps"]:
                evaluation = evaluate(model, held, t["batch_size"])
                row["heldout_loss"] = evaluation["loss"]
            report.append_metrics(out / METRICS, row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            bar.update(1)
            if loop.step % t["checkpoint_every"] == 0 or loop.step in (t["steps"], until):
                _save(out, model, loop)
    except KeyboardInterrupt:
        _save(out, model, loop)
        raise KeyboardInterrupt(f"interrupted at step {loop.step}; checkpoint saved: resume with "
                                f"svdkit pretrain --config {out / CONFIG} --out {out} --resume") from None  # fmt: skip
    finally:
        bar.close()
    if loop.step < t["steps"]:
        return None
    return _finish(cfg, out, model, loop, text, held, evaluation or evaluate(model, held, t["batch_size"]), log)


def _finish(cfg, out: Path, model, loop, text, held, evaluation: dict, log) -> dict:
    from svdkit.optim import memory_report

    t = cfg.tier()
    emb = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    summary = {"optimizer": cfg.optimizer, "method_config": cfg.method_config().to_dict(), "size": cfg.size,
               "steps": t["steps"], "tokens": t["steps"] * t["batch_size"] * t["seq_len"], "seed": cfg.seed,
               "parameters": total, "embedding_parameters": emb, "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "heldout": {**evaluation, "blocks": len(held)}, "corpus": text["info"],
               "optimizer_state_bytes": memory_report(loop.optimizer)["state_bytes"],
               "memory_report": memory_report(loop.optimizer),
               "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "train": report.train_stats(report.read_metrics(out / METRICS))}  # fmt: skip
    write_text(out / "eval.json", json.dumps(summary, indent=2) + "\n")
    text["tokenizer"].save(str(out / "tokenizer.json"))
    report.plot_losses(out / METRICS, out / "loss.png")
    log(f"svdkit pretrain: {cfg.optimizer} ({cfg.size}), {t['steps']} steps, {summary['tokens']:,} tokens; held-out loss "
        f"{evaluation['loss']:.4f} (perplexity {evaluation['perplexity']:.2f}); optimizer state "
        f"{summary['optimizer_state_bytes'] / 2**20:.2f} MiB; {summary['train']['median_step_s']} s/step median\n"
        f"wrote {out}/: config.json metrics.jsonl loss.png eval.json tokenizer.json checkpoint/")  # fmt: skip
    return summary
