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
      [--ratios 0.2,0.4,0.6] [--methods svd,asvd,...] [--heal-steps 20] [--out benchmarks/results/compress.md]
      [--reuse] [--measure 0.4,0.6] [--option asvd:allocation=uniform]
Every measured row is also stored in ``<out>.json`` (keyed by method, ratio, options, calibration size, with the
held-out/calibration settings); ``--reuse`` keeps the rows already there for the same settings, so the grid can
be filled by several shorter runs (each run says which rows it measured and which it reused); ``--measure``
limits the ratios measured in this run (the others are shown only where ``--reuse`` finds them; "none": only
render the table from the stored rows).
(one thread: on a shared 2-core machine OpenMP's spinning threads make LAPACK ~10× slower.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch  # noqa: E402

import svdkit  # noqa: E402
from common import log, provenance, write_report
from svdkit.training import batches as tensors, data  # noqa: E402

METHODS = ("svd", "fwsvd", "asvd", "svd-llm", "svd-llm-v2", "welore", "clover-prune")
PARTIAL = {"clover-prune": "v_proj + o_proj only"}  # methods whose ratio is of a subset of the linears


def parse_value(text: str):
    """'0.25' → 0.25, '3' → 3, 'true' → True, other text as is (for --option)."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def same_settings(old: dict | None, new: dict) -> bool:
    """Stored rows are reusable when the evaluation is the same: the dense perplexity may differ in its last
    digits on another CPU (BLAS round-off), so it is compared to 1e-5 relative, the rest exactly."""
    if not old or set(old) != set(new):
        return False
    rest = all(old[k] == new[k] for k in new if k != "dense_ppl")
    return rest and math.isclose(old["dense_ppl"], new["dense_ppl"], rel_tol=1e-5)


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
    ap.add_argument("--reuse", action="store_true", help="keep rows already stored in <out>.json for the same settings")
    ap.add_argument("--measure", default=None, help="ratios to measure (default: all of --ratios; 'none': only reuse)")
    ap.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                    help="a config option for one method's rows, e.g. asvd:allocation=uniform (repeatable)")
    args = ap.parse_args()
    method_options: dict[str, dict] = {}
    for spec in args.option:
        method, _, kv = spec.partition(":")
        key, _, value = kv.partition("=")
        method_options.setdefault(method, {})[key] = parse_value(value)
    ratios = [float(r) for r in args.ratios.split(",")]
    measure = ratios if args.measure is None else [] if args.measure == "none" else [float(r) for r in args.measure.split(",")]
    if measure and not args.reuse and measure != ratios:
        ap.error("--measure needs --reuse (the other ratios come from the stored rows)")
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
    store_path = os.path.splitext(args.out)[0] + ".json"
    settings = {"heldout": len(held), "sequence": 128, "dense_ppl": round(dense, 6), "seed": 0}
    store = {"settings": settings, "rows": {}}
    if args.reuse and os.path.exists(store_path):
        with open(store_path) as f:
            old = json.load(f)
        if same_settings(old.get("settings"), settings):
            store = old
        else:
            log(f"{store_path} has other settings ({old.get('settings')}); not reusing it")
    measured, reused = [], []

    def key(method: str, ratio: float, n_cal: int, options: dict) -> str:
        return json.dumps([method, ratio, n_cal, sorted(options.items())])

    def run(method: str, ratio: float, n_cal: int, **options) -> tuple[dict, torch.nn.Module | None]:
        k = key(method, ratio, n_cal, options)
        if k in store["rows"] and not options.get("update"):  # the update rows feed the healing step: rerun
            reused.append(k)
            return store["rows"][k], None
        if ratio not in measure:
            return None, None
        model = copy.deepcopy(base)
        cfg = svdkit.config(method, ratio=ratio, **options)
        t = time.perf_counter()
        report = svdkit.compress(model, cfg, calibration=cal(n_cal) if cfg.uses_calibration else None, progress=False)
        seconds = time.perf_counter() - t  # calibration + compression, not the held-out evaluation
        row = {"ppl": ppl(model), "compress_s": seconds, "seconds": time.perf_counter() - t, "removed": report.removed,
               "peak_mib": report.statistics_peak_bytes / 2**20, "all_mib": report.statistics_total_bytes / 2**20,
               "mode": report.mode, "forward": forward_ratio(model, base, timing)}  # fmt: skip
        log(f"{method} {options} ratio {ratio} cal {n_cal}: {row}")
        store["rows"][k] = row
        measured.append(k)
        write_report(store_path, json.dumps(store, indent=1) + "\n")
        return row, model

    methods = args.methods.split(",")
    steps: list = []

    def table() -> str:
        lines = provenance(f"held-out {len(held)} × 128 tokens of lee_background (disjoint from calibration); "
                           f"calibration {args.calibration} × 128 tokens; threads {torch.get_num_threads()}")  # fmt: skip
        lines += ["", f"Dense (untouched) perplexity: **{dense:.2f}**.", "",
                  "| method | " + " | ".join(f"ppl @ {r:.0%} removed" for r in ratios) + " | ppl / dense @ first measured | "
                  "compress s per ratio | stats held at once / all, MiB | forward time vs original | removed (achieved) |",
                  "|---|" + "---|" * (len(ratios) + 5)]  # fmt: skip
        for method in methods:
            got = {r: results[(method, r)] for r in ratios if results.get((method, r)) is not None}
            if not got:
                continue
            first = got[min(got)]
            opts = method_options.get(method)
            label = method + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "")
            label += f" — ratio of {PARTIAL[method]}" if method in PARTIAL else ""
            cells = " | ".join(f"{got[r]['ppl']:.4g}" if r in got else "not run" for r in ratios)
            mem = f"{first['peak_mib']:.1f} / {first['all_mib']:.1f}" if first["all_mib"] else "0 (data-free or vectors)"
            fwd = " / ".join(f"{got[r]['forward']:.2f}×" for r in ratios if r in got)
            secs = " / ".join(f"{got[r]['compress_s']:.0f}" if "compress_s" in got[r] else f"{got[r]['seconds']:.0f}*"
                              for r in ratios if r in got)
            done = " / ".join(f"{got[r]['removed']:.2%}" for r in ratios if r in got)
            lines.append(f"| {label} | {cells} | {first['ppl'] / dense:.3g}× | {secs} | {mem} | {fwd} | {done} |")
        if steps:
            lines += ["", "Steps toward dense quality at 20 % removed (SVD-LLM):", "",
                      "| step | calibration sequences | ppl | ppl / dense |", "|---|---|---|---|"]  # fmt: skip
            lines += [f"| {name} | {n} | {p:.4g} | {p / dense:.3g}× |" for name, n, p in steps]
        if any("compress_s" not in results[k] for k in results if results[k] is not None):
            lines += ["", "\\* rows stored before the fix: these seconds also include the held-out perplexity evaluation."]
        if all(results.get((m, 0.2)) is not None for m in ("svd", "fwsvd", "asvd", "svd-llm")):
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
            results[(method, ratio)] = run(method, ratio, args.calibration, **method_options.get(method, {}))[0]
            write_report(args.out, table())
        if ratio == 0.2 and ratio in measure and "svd-llm" in methods and not args.no_steps:
            extras()
            write_report(args.out, table())
    text = table() + (f"\nRows measured in this run: {len(measured)}; reused from {store_path}: {len(reused)}"
                       f"{' (' + '; '.join(reused) + ')' if reused else ''}.\n")
    print(text)
    write_report(args.out, text)
    assert all(math.isfinite(r["ppl"]) or r["ppl"] == math.inf for r in results.values() if r is not None)


if __name__ == "__main__":
    main()
