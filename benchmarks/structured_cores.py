"""Step time of the structured-core methods (SVFT plain, CLOVER) next to LoRA r16, side by side in ONE process.

The default model (SmolLM2-135M-Instruct, fp32), one batch of ``--batch`` × ``--seq`` tokens (default 2 × 128,
as zoo_footprint.py), labels = inputs, AdamW at each method's lr; every variant adapts its own deepcopy of the
loaded model and gets one warm-up step, then ``--rounds`` rounds run one step of each variant round-robin, so
machine noise hits all alike. Reported: the median step and its ratio to LoRA r16's median (target ≤ 1.3×,
issue 13), with each round's times. Cheaper than zoo_footprint.py (one process, no memory subprocesses) for a
quick check on a loaded machine; run it with ``OMP_NUM_THREADS=1`` there (LAPACK/BLAS threads spin under
oversubscription: a 576×576 SVD took 12 s with 2 threads and 1 s with 1 on a 2-core machine at load 14).

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/structured_cores.py [--methods lora,svft-plain,clover]
          [--rounds 3] [--batch 2] [--seq 128] [--out benchmarks/results/structured_cores.md]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

import svdkit
from common import log, make_batch, provenance, write_report
from zoo_footprint import make_step

VARIANTS = {
    "lora": lambda: svdkit.LoRA(rank=16),
    "svft-plain": lambda: svdkit.SVFT(pattern="plain"),
    "svft-banded": lambda: svdkit.SVFT(pattern="banded"),
    "svft-plain-fold": lambda: svdkit.SVFT(pattern="plain", fold=True),
    "clover": lambda: svdkit.config("clover"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,svft-plain,clover", help=f"comma-separated, from {sorted(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/structured_cores.md")
    args = parser.parse_args()
    names = args.methods.split(",")
    if names[0] != "lora" or any(n not in VARIANTS for n in names):
        raise SystemExit(f"--methods must start with lora (the reference) and name variants from {sorted(VARIANTS)}")
    pristine, tok = svdkit.load_model("default")
    ids = make_batch(tok, args.batch, args.seq)
    steps, params = {}, {}
    for name in names:
        model, cfg = copy.deepcopy(pristine), VARIANTS[name]()
        svdkit.adapt(model, cfg, progress=False)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        params[name] = sum(p.numel() for p in trainable)
        steps[name] = make_step(model, torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay), ids)
        steps[name]()  # warm-up
        log(f"ready {name}")
    times = {n: [] for n in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            gc.collect()
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        log(f"round {r}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    med = {n: statistics.median(t) for n, t in times.items()}
    lines = [
        "# Structured cores: step time next to LoRA r16 on SmolLM2-135M-Instruct (fp32)",
        "",
        *provenance(f"batch {args.batch} × {args.seq} tokens, {args.rounds} rounds round-robin in one process"),
        "",
        "| variant | trainable params | median step (s) | × LoRA r16 | steps per round (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {params[n]:,} | {med[n]:.3f} | {med[n] / med['lora']:.2f}× | "
                     f"{', '.join(f'{t:.2f}' for t in times[n])} |")  # fmt: skip
    report = "\n".join(lines) + "\n"
    print(report)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
