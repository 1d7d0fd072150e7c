"""Footprint of every registered method on the default model, relative to LoRA rank 16, side by side.

Each method runs at its paper's size where METHODS.md gives one for LLMs (PAPER_SIZES below: PiSSA,
SORSA, NLoRA/SLoRA/IntTune r = 128, MiLoRA 64, KaSA 32 with α = 64, Spectral Adapter 8, SVFT plain), else
at its config defaults (``svdkit.config(name)``; the config column shows what differs from the shared
fields)
on SmolLM2-135M-Instruct (fp32, all 210 block linears unless the method's default targets say
otherwise), one batch of ``--batch`` × ``--seq`` tokens of a fixed English paragraph, labels = inputs,
AdamW at the method's learning rate. Reported per method:

- trainable parameters and their ratio to LoRA r16's;
- init time (the ``svdkit.adapt`` call; for the data-aware methods also ``svdkit.calibrate`` on the timing
  batch, a stand-in for real calibration data: it measures cost, not quality);
- step time relative to LoRA r16: the method and a LoRA r16 reference each get their own copy of the
  model in ONE subprocess, one warm-up step each, then ``--rounds`` rounds alternate ``--steps`` timed
  steps of each; ratio = median(method) / median(LoRA) from the same process, so drift between
  subprocesses cancels;
- peak training memory relative to LoRA r16: one fresh subprocess per method (and one for LoRA) takes
  VmHWM over the warm-up and timed steps above VmRSS of the loaded model (every weight page touched,
  high-water mark reset after ``adapt``), as in train_overhead.py.

Run:  .venv/bin/python benchmarks/zoo_footprint.py [--methods a,b,...] [--rounds 3] [--steps 2]
          [--batch 2] [--seq 128] [--out benchmarks/results/zoo_footprint.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import svdkit
from common import provenance, log, make_batch, malloc_trim, proc_status_kib, resident_model, reset_hwm, write_report

REFERENCE = "lora"
# The papers' sizes where METHODS.md gives one for LLMs (other fields: the config defaults). SALT's r = 256
# (SAM) exceeds k − t = 173 on SmolLM2's 192-row k/v projections, so it keeps svdkit's r = 16.
PAPER_SIZES = {
    "pissa": dict(rank=128), "milora": dict(rank=64), "sorsa": dict(rank=128), "kasa": dict(rank=32, alpha=64),
    "spectral-a": dict(rank=8), "spectral-r": dict(rank=8), "nlora": dict(rank=128), "slora": dict(rank=128),
    "inttune": dict(rank=128), "svft": dict(pattern="plain"),
}


def adapt(name: str, model, ids, paper_size: bool = True):
    """Adapt ``model`` in place; data-aware methods calibrate on the timing batch (counted in the init time)."""
    cfg = svdkit.config(name, **(PAPER_SIZES.get(name, {}) if paper_size else {}))
    t0 = time.perf_counter()
    calibration = None
    if cfg.uses_calibration:
        calibration = svdkit.calibrate(model, [{"input_ids": ids, "labels": ids}], cfg, progress=False)
    svdkit.adapt(model, cfg, calibration=calibration, progress=False)
    init_s = time.perf_counter() - t0
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return cfg, opt, sum(p.numel() for p in params), init_s


def make_step(model, opt, ids):
    def step() -> None:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss + svdkit.regularization(model)
        loss.backward()
        svdkit.after_clipping(model, opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        svdkit.after_step(model, state["step"], 10**6)  # e.g. Sculpt's re-projection; schedules far from their end
    state = {"step": 0}
    return step


def config_summary(cfg) -> str:
    """The config fields that differ from the shared AdapterConfig defaults (what makes the preset)."""
    base = {f.name: f.default for f in dataclasses.fields(svdkit.AdapterConfig) if f.default is not dataclasses.MISSING}
    shown = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if f.name not in ("targets", "overrides") and base.get(f.name, object()) != getattr(cfg, f.name)}  # fmt: skip
    if cfg.uses_rank:
        shown["rank"] = cfg.rank
    return (", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or "defaults").replace("|", "\\|")


# -- subprocess modes -------------------------------------------------------------------------------
def timing_child(args) -> dict:
    """The method and the LoRA reference side by side in this process."""
    pristine, tok = svdkit.load_model("default")
    ids = make_batch(tok, args.batch, args.seq)
    runs = {}
    for key, name in (("method", args.method), ("reference", REFERENCE)):
        model = pristine if key == "reference" else _copy(pristine)
        cfg, opt, n_params, init_s = adapt(name, model, ids, paper_size=key == "method")
        runs[key] = dict(step=make_step(model, opt, ids), params=n_params, init_s=init_s, config=config_summary(cfg))
    times = {name: [] for name in runs}
    for name in runs:
        runs[name]["step"]()  # warm-up
    for _ in range(args.rounds):
        for name, run in runs.items():
            for _ in range(args.steps):
                gc.collect()
                t0 = time.perf_counter()
                run["step"]()
                times[name].append(time.perf_counter() - t0)
    med = {key: statistics.median(t) for key, t in times.items()}
    own = runs["method"]
    return dict(method=args.method, params=own["params"], ref_params=runs["reference"]["params"], init_s=own["init_s"],
                step_s=med["method"], ref_step_s=med["reference"], config=own["config"])  # fmt: skip


def _copy(model):
    import copy

    return copy.deepcopy(model)


def memory_child(args) -> dict:
    model, ids, base, _ = resident_model(args.batch, args.seq)
    _, opt, _, _ = adapt(args.method, model, ids)
    gc.collect()
    malloc_trim()
    reset_hwm()
    step = make_step(model, opt, ids)
    for _ in range(1 + args.steps):
        step()
    return dict(method=args.method, peak_kib=proc_status_kib("VmHWM") - base)


def run_child(mode: str, method: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--method", method, "--rounds", str(args.rounds),
           "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        return dict(error=last)
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated method names (default: every registered method)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round (default 2)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch (default 2)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--out", default="benchmarks/results/zoo_footprint.md", help="markdown report path")
    parser.add_argument("--child", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps((timing_child if args.child == "time" else memory_child)(args)))
        return

    names = args.methods.split(",") if args.methods else svdkit.methods()
    ref_mem = run_child("memory", REFERENCE, args)
    log(f"memory  {REFERENCE}: {ref_mem}")
    rows = []
    for name in names:
        t, m = run_child("time", name, args), run_child("memory", name, args)
        rows.append((name, t, m))
        log(f"{name}: {t} {m}")

    lines = [
        "# Method footprints on SmolLM2-135M-Instruct (fp32), relative to LoRA rank 16",
        "",
        *provenance(f"batch {args.batch} × {args.seq} tokens, {args.rounds} rounds × {args.steps} steps alternating "
                    "with LoRA r16 in the same process"),
        "",
        "| method | config | trainable params | × LoRA r16 | init (s) | step (s) | step × LoRA r16 | peak training memory (MiB) | memory × LoRA r16 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t, m in rows:
        if "error" in t or "error" in m:
            lines.append(f"| {name} | — | — | — | — | — | — | — | failed: {t.get('error') or m.get('error')} |")
            continue
        mem_ratio = m["peak_kib"] / ref_mem["peak_kib"] if "peak_kib" in ref_mem else float("nan")
        lines.append(f"| {name} | {t['config']} | {t['params']:,} | {t['params'] / t['ref_params']:.3f}× | "
                     f"{t['init_s']:.2f} | {t['step_s']:.3f} | {t['step_s'] / t['ref_step_s']:.2f}× | "
                     f"{m['peak_kib'] / 1024:.0f} | {mem_ratio:.2f}× |")  # fmt: skip
    lines += ["", "LoRA r16 reference: peak training memory "
              f"{ref_mem.get('peak_kib', float('nan')) / 1024:.0f} MiB above the loaded model."]  # fmt: skip
    report = "\n".join(lines) + "\n"
    print(report)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
