"""Overfitting gap of BiLoRA (bi-level: P, Q on split D₁, λ on split D₂) vs AdaLoRA at the same budget.

SmolLM2-135M-Instruct (fp32), adapters on the attention projections. Data: the default chatterbot
conversations (≤ ``--max-length`` tokens), seeded split into a small training set (``--train`` items, small on
purpose: a few epochs in the run, so the adapters can overfit) and a held-out set (``--heldout`` items, never
trained on). Methods at the same initial budget r(m + n + 1) per matrix (r = ``--rank``):

  bilora    P diag(λ) Q; P, Q step on D₁ batches, λ on D₂ batches (D₂ = 20 % of the training items), alternating
  adalora   P diag(λ) Q on every training item; budget pruned from r to target_r = ⌊2r/3⌋ (its defaults' ratio)
  lora      LoRA at rank r (reference)

Each trains ``--steps`` AdamW steps of ``--batch`` items (svdkit's loop: ``train_step``, warm-up + cosine, the
methods' regularizers, BiLoRA's two splits through ``data_splits``/``split_schedule``) at each LR of ``--lrs``,
for each seed of ``--seeds`` (the LRs are above the methods' 5e-4: with λ = 0 and P, Q ~ N(0, 0.02²) at init
the P diag(λ) Q methods barely move in a few dozen steps at 5e-4). Every ``--eval-every`` steps: the loss on all training items (D₁ ∪ D₂ for
BiLoRA, the same items for every method) and on the held-out items. Gap = held-out − training loss at the last
step (the overfitting the paper's bi-level split is meant to reduce, https://arxiv.org/abs/2403.13037).

Verdict rule (fixed before the run): at each LR, with the gap and held-out loss averaged over the seeds,
"holds" if BiLoRA's gap is smaller than AdaLoRA's by ≥ 0.05 and its held-out loss is not worse by more than
0.05; "does not hold" if its gap is larger by ≥ 0.05 or its held-out loss worse by more than 0.05 with no gap
gain; else "inconclusive".

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bilevel.py [--steps 60] [--lrs 2e-3,1e-2] [--seeds 0,1]
      [--out benchmarks/results/bilevel.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import svdkit
from common import log, provenance, write_report
from svdkit.core.models import load_model
from svdkit.training import data
from svdkit.training.batches import batch_at, collate, eval_loss
from svdkit.training.loop import data_splits, make_optimizer, split_schedule, train_step

GAP_MARGIN = 0.05


def configs(rank: int, seed: int) -> dict:
    return {"bilora": svdkit.BiLoRA(rank=rank, targets="attention", seed=seed),
            "adalora": svdkit.AdaLoRA(rank=rank, target_r=max(1, 2 * rank // 3), targets="attention", seed=seed),
            "lora": svdkit.LoRA(rank=rank, targets="attention", seed=seed)}  # fmt: skip


def run(label: str, cfg, train: list, held: list, pad: int, args, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    model, _ = load_model("default")
    svdkit.adapt(model, cfg, progress=False)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    loop = make_optimizer(model, lr, cfg.weight_decay, args.steps, max(1, args.steps // 10))
    splits, schedule = data_splits(model, train, seed), split_schedule(model)
    curve, start = [], time.perf_counter()
    model.train()
    while loop.step < args.steps:
        split, index = next(schedule)
        batch = collate(batch_at(splits[split], index, args.batch, seed), pad)
        train_step(model, model, [batch], loop, max_grad_norm=1.0, peak_lr=lr, total=args.steps, split=split)
        if loop.step % args.eval_every == 0 or loop.step == args.steps:
            model.eval()
            tr, he = eval_loss(model, train, 8, pad)[0], eval_loss(model, held, 8, pad)[0]
            model.train()
            curve.append((loop.step, round(tr, 4), round(he, 4)))
            log(f"{label} lr {lr:g} seed {seed} step {loop.step}: train {tr:.4f} held-out {he:.4f}")
    _, tr, he = curve[-1]
    return {"method": label, "lr": lr, "seed": seed, "params": params, "curve": curve, "train": tr, "heldout": he,
            "gap": he - tr, "best_heldout": min(h for _, _, h in curve), "seconds": time.perf_counter() - start}


def verdict(bi: dict, ada: dict) -> str:
    gain = ada["gap"] - bi["gap"]
    worse = bi["heldout"] - ada["heldout"]
    if gain >= GAP_MARGIN and worse <= GAP_MARGIN:
        return "holds"
    if gain <= -GAP_MARGIN or (worse > GAP_MARGIN and gain < GAP_MARGIN):
        return "does not hold"
    return "inconclusive"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=12)
    p.add_argument("--train", type=int, default=40)
    p.add_argument("--heldout", type=int, default=40)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--lrs", default="2e-3,1e-2")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default="benchmarks/results/bilevel.md")
    args = p.parse_args()
    lrs, seeds = [float(x) for x in args.lrs.split(",")], [int(x) for x in args.seeds.split(",")]
    _, tok = load_model("default")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = data.load_examples("default", tok, max_length=args.max_length).items
    pool, held = data.split(examples, 0.5, 0)
    train, held = pool[: args.train], held[: args.heldout]
    rows = [run(label, cfg, train, held, pad, args, lr, seed)
            for lr in lrs for seed in seeds for label, cfg in configs(args.rank, seed).items()]  # fmt: skip
    mean = lambda xs: statistics.fmean(xs)  # noqa: E731
    lines = provenance(f"{len(train)} training / {len(held)} held-out chatterbot items (≤ {args.max_length} tokens), "
                       f"rank {args.rank}, {args.steps} steps of {args.batch}, seeds {args.seeds}, threads {torch.get_num_threads()}")  # fmt: skip
    lines += ["", "| LR | method | trainable params | train loss (last) | held-out loss (last) | gap (held-out − train) "
              "| best held-out (every eval) | per seed: gap |", "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    summary = {}
    for lr in lrs:
        for label in configs(args.rank, 0):
            rs = [r for r in rows if r["lr"] == lr and r["method"] == label]
            s = {k: mean([r[k] for r in rs]) for k in ("train", "heldout", "gap", "best_heldout")}
            summary[(lr, label)] = s
            lines.append(f"| {lr:g} | {label} | {rs[0]['params']:,} | {s['train']:.4f} | {s['heldout']:.4f} | "
                         f"**{s['gap']:.4f}** | {s['best_heldout']:.4f} | {' / '.join(format(r['gap'], '.4f') for r in rs)} |")  # fmt: skip
    lines += ["", "Verdict per LR (BiLoRA vs AdaLoRA; rule in the script's docstring): " + "; ".join(
        f"lr {lr:g}: **{verdict(summary[(lr, 'bilora')], summary[(lr, 'adalora')])}** (gap {summary[(lr, 'bilora')]['gap']:.4f} "
        f"vs {summary[(lr, 'adalora')]['gap']:.4f}, held-out {summary[(lr, 'bilora')]['heldout']:.4f} vs "
        f"{summary[(lr, 'adalora')]['heldout']:.4f})" for lr in lrs) + "."]  # fmt: skip
    write_report(args.out, "\n".join(lines) + "\n")
    write_report(args.out.replace(".md", ".json"), json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
