"""Perplexity of every compression method on the default model at 20/40/60 % of the linears' parameters removed.

SmolLM2-135M-Instruct (fp32), all block linears (210 matrices). Text: gensim's lee_background corpus cut into
128-token sequences and split in two disjoint halves (seed 0): calibration sequences come from one half,
the held-out perplexity from the other (``--heldout`` sequences). For each (method, ratio) a fresh copy of
the model is compressed with ``svdkit.compress`` (whitening methods layer by layer) and measured:
held-out perplexity, compression time (calibration included), the calibration statistics held at once
(layer-by-layer) vs all modules' together, and the forward time of the compressed model relative to the
original on one 4×128 batch (median of 3, measured alternately, side by side).

Then the steps toward dense quality at 20 %: SVD-LLM with the closed-form update, with 4× more calibration
data, and a short healing fine-tune (LoRA rank 8 on every linear — the factors included — on the
calibration half, AdamW) of the last one. The papers' ordering at 20 % on LLaMA-7B WikiText-2
(SVD 20061 ≫ FWSVD 1727 ≫ ASVD 11.14 > SVD-LLM 7.94) is checked on the 20 % column.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compress.py [--heldout 16] [--calibration 16]
      [--ratios 0.2,0.4,0.6] [--heal-steps 20] [--out benchmarks/results/compress.md]
(one thread: on a shared 2-core machine OpenMP's spinning threads make LAPACK ~10× slower.)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch  # noqa: E402

import svdkit  # noqa: E402
from common import log, provenance, write_report
from svdkit.training import batches as tensors, data  # noqa: E402

METHODS = ("svd", "fwsvd", "asvd", "svd-llm", "svd-llm-v2", "welore")


def forward_ratio(model, base, batch, repeats: int = 3) -> float:
    times = {0: [], 1: []}
    with torch.no_grad():
        for _ in range(repeats + 1):
            for i, m in enumerate((base, model)):
                t = time.perf_counter()
                m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                times[i].append(time.perf_counter() - t)
    return statistics.median(times[1][1:]) / statistics.median(times[0][1:])


def heal(model, train, pad, steps: int, lr: float, seed: int = 0) -> None:
    """LoRA (rank 8, all linears) trained ``steps`` AdamW steps of 4 sequences, then merged."""
    torch.manual_seed(seed)
    svdkit.adapt(model, svdkit.config("lora", rank=8, targets="all-linear", seed=seed))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(train), (4,), generator=g).tolist()
        batch = tensors.collate([train[i] for i in idx], pad)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if step % 5 == 0:
            log(f"  heal step {step}: loss {loss.item():.3f}")
    model.eval()
    svdkit.merge(model)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--calibration", type=int, default=16)
    ap.add_argument("--more-calibration", type=int, default=64)
    ap.add_argument("--ratios", default="0.2,0.4,0.6")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--heal-steps", type=int, default=20)
    ap.add_argument("--heal-lr", type=float, default=3e-4)
    ap.add_argument("--no-steps", action="store_true", help="skip the SVD-LLM steps (update, more data, healing)")
    ap.add_argument("--out", default="benchmarks/results/compress.md")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    base, tok = svdkit.load_model("default")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = data.load_examples("lee", tok, max_length=128)
    train, held = data.split(examples, 0.5, 0)
    held = held[: args.heldout]
    cal = lambda n: [tensors.collate(train[i: i + 4], pad) for i in range(0, n, 4)]  # noqa: E731
    timing = tensors.collate(held[:4], pad)
    ppl = lambda m: tensors.eval_loss(m, held, 8, pad)[1]  # noqa: E731
    dense = ppl(base)
    log(f"dense perplexity {dense:.3f} on {len(held)} × 128 held-out tokens")
    results: dict[tuple[str, float], dict] = {}

    def run(method: str, ratio: float, n_cal: int, **options) -> tuple[dict, torch.nn.Module]:
        model = copy.deepcopy(base)
        cfg = svdkit.config(method, ratio=ratio, **options)
        t = time.perf_counter()
        report = svdkit.compress(model, cfg, calibration=cal(n_cal) if cfg.uses_calibration else None, progress=False)
        row = {"ppl": ppl(model), "seconds": time.perf_counter() - t, "removed": report.removed,
               "peak_mib": report.statistics_peak_bytes / 2**20, "all_mib": report.statistics_total_bytes / 2**20,
               "mode": report.mode, "forward": forward_ratio(model, base, timing)}  # fmt: skip
        log(f"{method} {options} ratio {ratio} cal {n_cal}: {row}")
        return row, model

    methods = args.methods.split(",")
    steps: list = []

    def table() -> str:
        lines = provenance(f"held-out {len(held)} × 128 tokens of lee_background (disjoint from calibration); "
                           f"calibration {args.calibration} × 128 tokens; threads {torch.get_num_threads()}")  # fmt: skip
        lines += ["", f"Dense (untouched) perplexity: **{dense:.2f}**.", "",
                  "| method | " + " | ".join(f"ppl @ {r:.0%} removed" for r in ratios) + " | ppl / dense @ first | "
                  "compress s (first) | stats held at once / all, MiB | forward time vs original |",
                  "|---|" + "---|" * (len(ratios) + 4)]  # fmt: skip
        for method in methods:
            got = {r: results[(method, r)] for r in ratios if (method, r) in results}
            if ratios[0] not in got:
                continue
            first = got[ratios[0]]
            cells = " | ".join(f"{got[r]['ppl']:.4g}" if r in got else "not run" for r in ratios)
            mem = f"{first['peak_mib']:.1f} / {first['all_mib']:.1f}" if first["all_mib"] else "0 (data-free or vectors)"
            fwd = " / ".join(f"{got[r]['forward']:.2f}×" for r in ratios if r in got)
            lines.append(f"| {method} | {cells} | {first['ppl'] / dense:.3g}× | {first['seconds']:.0f} | {mem} | {fwd} |")
        if steps:
            lines += ["", "Steps toward dense quality at 20 % removed (SVD-LLM):", "",
                      "| step | calibration sequences | ppl | ppl / dense |", "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {name} | {n} | {p:.4g} | {p / dense:.3g}× |" for name, n, p in steps]
        if all((m, 0.2) in results for m in ("svd", "fwsvd", "asvd", "svd-llm")):
            p = {m: results[(m, 0.2)]["ppl"] for m in ("svd", "fwsvd", "asvd", "svd-llm")}
            holds = p["svd"] > p["fwsvd"] > p["asvd"] > p["svd-llm"]
            gain = p["svd"] / p["svd-llm"]
            lines += ["", f"Papers' ordering at 20 % (SVD ≫ FWSVD ≫ ASVD > SVD-LLM): **{'holds' if holds else 'does not hold'}** "
                      f"here ({' > '.join(f'{m} {p[m]:.4g}' for m in sorted(p, key=p.get, reverse=True))}). "
                      f"SVD-LLM is {gain:.3g}× better than plain SVD (target ≥ 100×: {'met' if gain >= 100 else 'missed'})."]  # fmt: skip
        return "\n".join(lines) + "\n"

    def extras() -> None:
        steps.append(("SVD-LLM, whitening only", args.calibration, results[("svd-llm", 0.2)]["ppl"]))
        write_report(args.out, table())
        row, _ = run("svd-llm", 0.2, args.calibration, update=True)
        steps.append(("+ closed-form update", args.calibration, row["ppl"]))
        write_report(args.out, table())
        row, model = run("svd-llm", 0.2, args.more_calibration, update=True)
        steps.append(("+ update, more calibration", args.more_calibration, row["ppl"]))
        write_report(args.out, table())
        if args.heal_steps:
            t = time.perf_counter()
            heal(model, train, pad, args.heal_steps, args.heal_lr)
            steps.append((f"+ healing: LoRA r=8 on every linear, {args.heal_steps} steps × 4 × 128 tokens, lr "
                          f"{args.heal_lr:g} ({time.perf_counter() - t:.0f} s)", args.more_calibration, ppl(model)))  # fmt: skip

    for ratio in ratios:  # the 20 % column first, then its SVD-LLM steps, then the higher ratios
        for method in methods:
            results[(method, ratio)] = run(method, ratio, args.calibration)[0]
            write_report(args.out, table())
        if ratio == 0.2 and "svd-llm" in methods and not args.no_steps:
            extras()
            write_report(args.out, table())
    text = table()
    print(text)
    write_report(args.out, text)
    assert all(math.isfinite(r["ppl"]) or r["ppl"] == math.inf for r in results.values())


if __name__ == "__main__":
    main()
