"""Continual fine-tuning on the default model: Sculpting Subspaces (OSFT) vs plain sequential full
fine-tuning vs sequential LoRA, on chatterbot topics trained one after another.

Each method starts from a fresh SmolLM2-135M-Instruct (fp32) and trains ``--steps`` AdamW steps per task
(batch ``--batch``, examples ≤ ``--max-length`` tokens, warm-up 3 % + cosine per task) on the tasks in order;
after each task every task's held-out loss is measured (``--heldout`` examples each, the same for all
methods). Forgetting of a task = its loss after the last task − its loss right after its own training.
Full and Sculpt share ``--lr`` (full-rank methods); LoRA (r 16) uses ``--lora-lr``. Every method adapts the same
``--targets`` (default the attention linears: Sculpt's per-step projection of the 1536×576 MLP matrices costs
more than the training step on this CPU).
Paper claim (https://arxiv.org/abs/2504.07097): far less forgetting than sequential full fine-tuning at
similar new-task loss.

Run:  OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/continual.py [--tasks default@ai,default@trivia]
      [--steps 20] [--batch 8] [--lr 1e-4] [--lora-lr 2e-4] [--energy 0.9] [--project update] [--targets attention]
      [--methods sculpt,full,lora] [--out benchmarks/results/continual.md]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import log, provenance, write_report
from svdkit.core.models import load_model
from svdkit.training.continual import ContinualConfig, continual, load_task, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="default@ai,default@trivia")
    p.add_argument("--methods", default="sculpt,full,lora")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--heldout", type=int, default=24)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--energy", type=float, default=0.9)
    p.add_argument("--project", default="update")
    p.add_argument("--targets", default="attention", help="target linears of every method (projections on the MLPs are slow on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/continual.md")
    args = p.parse_args()
    specs = args.tasks.split(",")
    results, seconds = [], {}
    for method in args.methods.split(","):
        model, tok = load_model("default")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        tasks = [load_task(s, tok, max_length=args.max_length, heldout_fraction=0.2, max_heldout=args.heldout,
                           seed=args.seed) for s in specs]  # fmt: skip
        options = {"targets": args.targets, **({"energy": args.energy, "project": args.project} if method == "sculpt" else {})}
        lr = args.lora_lr if method == "lora" else args.lr
        cfg = ContinualConfig(method=method, method_options=options, steps=args.steps, batch_size=args.batch, lr=lr,
                              seed=args.seed)  # fmt: skip
        start = time.perf_counter()
        results.append(continual(model, tasks, cfg, pad_id=pad, progress=True))
        seconds[method] = time.perf_counter() - start
        if method == "sculpt":
            from svdkit.adapters.zoo.sculpt import protected_ranks

            ranks = protected_ranks(model)
            shapes = {n: min(m.weight.shape) for n, m in model.named_modules() if n in ranks}
            results[-1]["kept_share"] = sum(ranks[n] / shapes[n] for n in ranks) / len(ranks)
        log(f"{method}: {seconds[method]:.0f} s, losses {results[-1]['losses']}")
        del model
    sizes = ", ".join(f"{t.name}: {len(t.train)} train / {len(t.heldout)} held-out" for t in tasks)
    lines = ["# Continual fine-tuning: Sculpting Subspaces vs sequential full fine-tuning vs LoRA", "",
             *provenance(f"single run, {args.steps} steps/task, batch {args.batch}, max length {args.max_length}, "
                         f"lr {args.lr:g} (full, sculpt) / {args.lora_lr:g} (LoRA r16), sculpt energy {args.energy:g}, "
                         f"project {args.project}, targets {args.targets} (all methods), seed {args.seed}"),
             "", f"Tasks in order: {sizes}.", "", "Held-out loss of each task (columns) after each task (rows):", "",
             table(results).rstrip(), "", "| method | mean forgetting | final mean loss | last task's loss after it | wall s |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['method']} | {r['mean_forgetting']:+.4f} | {r['final_mean_loss']:.4f} | "
                     f"{r['losses'][-1][-1]:.4f} | {seconds[r['method']]:.0f} |")  # fmt: skip
    if any("kept_share" in r for r in results):
        share = next(r["kept_share"] for r in results if "kept_share" in r)
        lines += ["", f"Sculpt protected on average {share:.1%} of each matrix's singular directions after the last task."]
    text = "\n".join(lines) + "\n"
    write_report(args.out, text)
    write_report(args.out.replace(".md", ".json"), json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
