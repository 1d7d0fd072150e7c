"""Calibration cost of the data-aware inits: svdkit.calibrate + svdkit.adapt versus PEFT's preprocessing.

On the default model (SmolLM2-135M-Instruct, fp32, 210 block linears q/k/v/o/gate/up/down; lm_head is
not adapted), with N calibration samples of the default data (chatterbot conversations, max length 128
tokens; the first N of a seed-0 permutation) for each N in ``--samples`` (default 64 and 256), rank 16.
Each variant's time covers everything from the un-adapted model to the adapted one:

  1. svdkit CorDA, batch B   calibrate(model, batches of B padded sequences, CorDA()) + adapt
  2. svdkit CorDA, batch 1   the same with one sequence per batch (like for like with 3)
  3. PEFT CorDA, batch 1     preprocess_corda(model, LoraConfig(init_lora_weights="corda", corda_method="ipm"),
                             run_model=one forward per sequence) + get_peft_model. PEFT's covariance hook
                             needs batches of one sequence (it squeezes dim 0 and ignores the attention mask).
  4. svdkit EVA, batch B     calibrate(model, batches of B, EVA()) + adapt (one pass over the batches)
  5. PEFT EVA, batch B       get_eva_state_dict(model, batches of B, LoraConfig(init_lora_weights="eva"))
                             + get_peft_model + initialize_lora_eva_weights. PEFT cycles the batches until
                             every layer's components converge; its forward passes are counted (capped at
                             ``--peft-eva-max-batches``; a capped run is reported as such).
     (4 and 5 only when svdkit has EVA.)

Time: ``--rounds`` rounds run the variants round-robin, each on a fresh ``copy.deepcopy`` of the pristine
model (not timed), torch's default threads; reported: median and min, and the median's ratio to PEFT's.
Peak memory: each variant in its own fresh subprocess (this script re-invoked with ``--variant NAME
--memory``): the calibration batches are built, the model loaded with every weight page touched and the
heap trimmed (VmRSS baseline), the kernel's RSS high-water mark reset, then the variant runs once;
peak = VmHWM − baseline (covariances/PCA state, SVD work, adapter tensors, activations).
Agreement (from the first round): for svdkit CorDA batch 1 vs PEFT CorDA, the median and worst layer's
‖BA_svdkit − BA_PEFT‖_F / ‖BA_PEFT‖_F (svdkit forms C̃⁻¹ and W C̃ in float64, PEFT in float32).

Run:  .venv/bin/python benchmarks/calibration.py [--samples 64 256] [--rounds 3] [--batch 8] [--rank 16]
          [--phase both|memory|time] [--out benchmarks/results/calibration.md]    smoke test: --samples 8 --rounds 1
(``--phase memory`` can run while the machine is busy; ``--phase time`` then times on a quiet machine.)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import peft
import torch

import svdkit
from common import provenance, log, proc_status_kib, resident_model, reset_hwm, write_report
from svdkit.training import data
from svdkit.training.batches import collate
from svdkit.adapters.api import adapted_layers

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_LENGTH = 128
SVD_CORDA, SVD_CORDA_1, PEFT_CORDA = "svdkit CorDA, batch {b}", "svdkit CorDA, batch 1", "PEFT CorDA, batch 1"
SVD_EVA, PEFT_EVA = "svdkit EVA, batch {b}", "PEFT EVA, batch {b}"


class PeftEvaCapped(RuntimeError):
    """PEFT's EVA did not converge within the allowed number of forward passes."""


def has_eva() -> bool:
    return "eva" in svdkit.methods()


def variant_names(batch: int) -> list[str]:
    names = [SVD_CORDA.format(b=batch), SVD_CORDA_1, PEFT_CORDA]
    return names + ([SVD_EVA.format(b=batch), PEFT_EVA.format(b=batch)] if has_eva() else [])


# -- data ----------------------------------------------------------------------------------------------
def calibration_items(tok, samples: int) -> list[dict]:
    examples = data.load_examples("default", tok, max_length=MAX_LENGTH)
    if samples > len(examples):
        raise SystemExit(f"the default data has {len(examples)} examples of ≤ {MAX_LENGTH} tokens; --samples {samples} is too many")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    return [examples[i] for i in order[:samples]]


def make_batches(items: list[dict], batch: int, pad_id: int) -> list[dict]:
    return [collate(items[i : i + batch], pad_id) for i in range(0, len(items), batch)]


def single_sequences(items: list[dict]) -> list[dict]:
    """One unpadded sequence per batch, input_ids only (what PEFT's CorDA hook expects)."""
    return [{"input_ids": torch.tensor([x["input_ids"]])} for x in items]


# -- variants: each adapts the given (already copied) model and returns (model, notes) ------------------
def peft_factors(model) -> dict:
    return {name.removeprefix("base_model.model."): (mod.lora_B["default"].weight.detach(), mod.lora_A["default"].weight.detach())
            for name, mod in model.named_modules() if isinstance(mod, peft.tuners.lora.LoraLayer)}  # fmt: skip


def run_variant(name: str, model, rank: int, batches: list[dict], singles: list[dict], eva_cap: int):
    notes: dict = {}
    if name.startswith("svdkit"):
        cfg = svdkit.CorDA(rank=rank) if "CorDA" in name else svdkit.EVA(rank=rank)
        data_ = singles if name == SVD_CORDA_1 else batches
        stats = svdkit.calibrate(model, data_, cfg, progress=False)
        svdkit.adapt(model, cfg, calibration=stats, progress=False)
        notes["factors"] = {n: (layer.lora_B.detach(), layer.lora_A.detach()) for n, layer in adapted_layers(model)}
        notes["forwards"] = stats.batches
        return model, notes
    from peft import LoraConfig, get_peft_model

    if name == PEFT_CORDA:
        from peft.tuners.lora.config import CordaConfig
        from peft.tuners.lora.corda import preprocess_corda

        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=BLOCK_LINEARS, lora_dropout=0.0,
                         init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))  # fmt: skip
        preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in singles])
        wrapped = get_peft_model(model, cfg)
        notes["forwards"] = len(singles)
    else:
        from peft import EvaConfig, initialize_lora_eva_weights
        from peft.tuners.lora.eva import get_eva_state_dict

        cfg = LoraConfig(r=rank, lora_alpha=1, target_modules=BLOCK_LINEARS, lora_dropout=0.0,
                         init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=0.99))  # fmt: skip
        count = [0]

        def forward(m, inputs):
            if count[0] >= eva_cap:
                raise PeftEvaCapped(f"no convergence within {eva_cap} forward passes")
            count[0] += 1
            return m(**inputs)

        try:
            state = get_eva_state_dict(model, batches, cfg, forward_fn=forward, show_progress_bar=False)
        finally:
            notes["forwards"] = count[0]
        wrapped = get_peft_model(model, cfg, low_cpu_mem_usage=True)
        initialize_lora_eva_weights(wrapped, eva_state_dict=state, show_progress_bar=False)
    notes["factors"] = peft_factors(wrapped)
    return wrapped, notes


def timed(name: str, model, args, batches, singles) -> tuple[float | None, dict]:
    gc.collect()
    t0 = time.perf_counter()
    try:
        _, notes = run_variant(name, model, args.rank, batches, singles, args.peft_eva_max_batches)
    except PeftEvaCapped:
        return None, {"forwards": args.peft_eva_max_batches, "capped": True}
    return time.perf_counter() - t0, notes


def agreement(ours: dict, theirs: dict) -> tuple[float, float, str]:
    """(median, worst, worst layer) of ‖B A − B' A'‖_F / ‖B' A'‖_F over the layers (fp64)."""
    rel = {}
    for name, (B, A) in theirs.items():
        ref = B.double() @ A.double()
        mine = ours[name][0].double() @ ours[name][1].double()
        rel[name] = float(torch.linalg.matrix_norm(mine - ref) / torch.linalg.matrix_norm(ref))
    worst = max(rel, key=rel.get)
    return statistics.median(rel.values()), rel[worst], worst


# -- memory (subprocess mode) ------------------------------------------------------------------------
RAW = Path(__file__).parent / "results" / "calibration.json"  # peaks per "samples/batch/rank", per variant

def memory_child(args) -> None:
    """Run one variant once in this (fresh) process; print one JSON line with its peak memory."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(svdkit.core.models.default_model_dir()))
    items = calibration_items(tok, args.samples[0])
    batches, singles = make_batches(items, args.batch, tok.pad_token_id), single_sequences(items)
    model, _, base_kib, trimmed = resident_model(1, 8)
    hwm_reset = reset_hwm()
    start = time.perf_counter()
    try:
        _, notes = run_variant(args.variant, model, args.rank, batches, singles, args.peft_eva_max_batches)
        capped = False
    except PeftEvaCapped:
        notes, capped = {"forwards": args.peft_eva_max_batches, "capped": True}, True
    seconds = None if capped else time.perf_counter() - start
    peak_kib = proc_status_kib("VmHWM") - base_kib
    print(json.dumps(dict(variant=args.variant, peak_kib=peak_kib, capped=capped, hwm_reset=hwm_reset, trimmed=trimmed,
                          seconds=seconds, forwards=notes["forwards"])))  # fmt: skip


def measure_memory(name: str, samples: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, "--memory", "--samples", str(samples),
           "--rank", str(args.rank), "--batch", str(args.batch), "--peft-eva-max-batches", str(args.peft_eva_max_batches)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess for {name!r} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------------
def _memory_phase(samples: int, args) -> dict:
    """Each variant's peak in a fresh subprocess (valid on a busy machine too), cached in the raw JSON so that
    ``--phase memory`` can run alongside other work and ``--phase time`` later on a quiet machine."""
    raw = json.loads(RAW.read_text()) if RAW.is_file() else {}
    key = f"{samples}/{args.batch}/{args.rank}"
    if args.phase != "time":
        raw[key] = {}
        for name in variant_names(args.batch):
            raw[key][name] = measure_memory(name, samples, args)
            log(f"N={samples} memory  {name:<24} peak {raw[key][name]['peak_kib'] / 1024:8.1f} MiB")
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps(raw, indent=1) + "\n")
    if key not in raw:
        raise SystemExit(f"no memory measurements for N={samples} in {RAW}: run with --phase memory first.")
    return raw[key]


def bench_samples(samples: int, args, pristine, tok) -> list[str]:
    names = variant_names(args.batch)
    mem = _memory_phase(samples, args)
    items = calibration_items(tok, samples)
    batches, singles = make_batches(items, args.batch, tok.pad_token_id), single_sequences(items)
    times: dict[str, list] = {name: [] for name in names}
    notes: dict[str, dict] = {}
    if args.rounds == 0:  # one fresh process per variant: its time comes from the memory subprocess
        for name in names:
            times[name].append(mem[name]["seconds"])
            notes[name] = {"forwards": mem[name]["forwards"], "capped": mem[name]["capped"]}
    for rnd in range(args.rounds):
        for name in names:
            elapsed, got = timed(name, copy.deepcopy(pristine), args, batches, singles)
            times[name].append(elapsed)
            notes.setdefault(name, got)
            log(f"N={samples} round {rnd + 1}/{args.rounds}  {name:<24} "
                + ("capped" if elapsed is None else f"{elapsed:8.2f} s") + f"  ({got['forwards']} forward passes)")
    tokens = sum(len(x["input_ids"]) for x in items)
    lines = [f"## {samples} samples ({tokens} tokens; batches of {args.batch}: {len(batches)} batches)", "",
             "| variant | median time (s) | min (s) | vs PEFT (median) | forward passes | peak memory (MiB) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in names:
        ok = [t for t in times[name] if t is not None]
        peft_name = PEFT_CORDA if "CorDA" in name else PEFT_EVA.format(b=args.batch)
        ref = [t for t in times[peft_name] if t is not None]
        med = statistics.median(ok) if ok else None
        ratio = f"{med / statistics.median(ref):.2f}×" if med and ref else "—"
        shown = "capped" if med is None else f"{med:.2f}"
        forwards = f"{notes[name]['forwards']}" + (" (cap)" if notes[name].get("capped") else "")
        lines.append(f"| {name} | {shown} | {min(ok):.2f} | {ratio} | {forwards} | {mem[name]['peak_kib'] / 1024:.1f} |"
                     if ok else f"| {name} | capped | — | — | {forwards} | {mem[name]['peak_kib'] / 1024:.1f} |")
    if "factors" in notes[SVD_CORDA_1] and "factors" in notes[PEFT_CORDA]:
        med, worst, layer = agreement(notes[SVD_CORDA_1]["factors"], notes[PEFT_CORDA]["factors"])
        lines += ["", f"CorDA agreement, svdkit batch 1 vs PEFT, ‖ΔBA‖_F/‖BA‖_F over layers: median {med:.1e}, "
                  f"worst {worst:.1e} ({layer}). Differences come from PEFT's float32 C̃⁻¹ and W C̃ (svdkit: float64); "
                  "they are large only where σ_r ≈ σ_(r+1) of W C̃, where the r-th component is ill-determined."]
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256], help="calibration sample counts (default 64 256)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the variants (default 3; 0: one "
                        "fresh process per variant gives both its time and its peak)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch for the batched variants (default 8)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    parser.add_argument("--peft-eva-max-batches", type=int, default=256,
                        help="cap on PEFT EVA's forward passes (it cycles the data until convergence; default 256)")
    parser.add_argument("--out", default="benchmarks/results/calibration.md", help="markdown report path")
    parser.add_argument("--phase", choices=("both", "memory", "time"), default="both",
                        help="memory: only the peak-memory subprocesses (cached in benchmarks/results/calibration.json; "
                             "fine on a busy machine); time: only the timing rounds, reusing the cached peaks")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: the memory subprocess's variant
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 0:
        parser.error("--rounds must be >= 0")
    for key in ("batch", "rank", "peft_eva_max_batches"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if min(args.samples) < 1:
        parser.error("--samples must be >= 1")
    if args.memory:
        memory_child(args)
        return
    if args.phase == "memory":
        for samples in args.samples:
            _memory_phase(samples, args)
        return

    pristine, tok = svdkit.load_model("default")
    pristine.eval()
    sections = [line for samples in args.samples for line in bench_samples(samples, args, pristine, tok)]
    lines = [
        f"# Calibration cost: svdkit.calibrate + adapt vs PEFT preprocessing, rank {args.rank}, SmolLM2-135M-Instruct (fp32)",
        "",
        *provenance(f"rounds {args.rounds}"),
        "",
        "Data: the default data (chatterbot conversations, ≤ 128 tokens each), the first N of a seed-0 permutation. "
        "Time: from the un-adapted model to the adapted one (statistics + decomposition + adapter), median over "
        "rounds, variants round-robin. Peak memory: VmHWM above the loaded model's VmRSS, one fresh subprocess "
        "per variant. PEFT's CorDA needs one sequence per forward pass; PEFT's EVA cycles the data until its "
        "components converge (forward passes counted), svdkit's EVA makes one pass.",
        "",
        *sections,
    ]
    report = "\n".join(lines)
    print(report)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
