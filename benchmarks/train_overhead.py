"""Training-step overhead of svdkit adapters over a frozen-base floor, versus PEFT LoRA, side by side.

On the default model (SmolLM2-135M-Instruct, fp32, 210 block linears q/k/v/o/gate/up/down; lm_head is
not adapted), one batch of ``--batch`` × ``--seq`` tokens (default 4 × 128) of real English text: a
fixed paragraph (PARAGRAPH below) tokenized once and repeated to fill the batch, each row starting at a
different offset; labels = input_ids (the model's own shifted cross-entropy). ``use_cache=False``,
``model.train()`` (the model has no dropout; adapter dropout is 0 everywhere). Variants:

  1. frozen base (floor)  the un-adapted model, every parameter requires_grad=False, but the input
                          embeddings' output requires grad (``model.enable_input_require_grads()``), so
                          backward runs through every layer as an adapter run's does: forward +
                          loss.backward(), no optimizer (nothing to update).
  2. svdkit LoRA r16      svdkit.adapt(model, LoRA(rank=16))                      ┐ forward + backward +
  3. svdkit PiSSA r16     svdkit.adapt(model, PiSSA(rank=16, svd="randomized"))   │ AdamW(lr=1e-4).step()
  4. … PiSSA fold=True    the residual form W_res = W − s·B₀A₀ (a new weight tensor │
                          replaces W; no A₀, B₀ in the forward)                   │
  5. PEFT LoRA r16        peft.get_peft_model(model, LoraConfig(r=16, lora_alpha=16, │ + zero_grad(
                          target_modules=<the 7 block linears>, lora_dropout=0))  ┘ set_to_none=True)
  with ``--fused``, also svdkit LoRA and PiSSA with input fusion on (``svdkit.fuse_shared_inputs(model,
  True)``: q/k/v and gate/up each share one GEMM per direction; the default is off), to show what the
  fusion saves side by side (step time only; their memory rows read nan).

Step time: every variant lives on its own ``copy.deepcopy`` of the pristine model and gets ``--warmup``
untimed steps; then ``--rounds`` rounds run the variants round-robin, ``--steps`` timed steps each
(``gc.collect()`` before every step, untimed), so machine noise hits all variants alike. Reported: median
and min over all rounds × steps, and the median's ratio to the floor's median; also the process CPU time
of each step (getrusage user + system), median and ratio: with one thread (``OMP_NUM_THREADS=1``) on a
machine shared with other jobs, CPU time does not count the time the process waits for a core, so its
ratios are the steadier measure of the work a step does. Torch's default threads.

Peak memory: each variant runs in its own fresh subprocess (this script re-invoked with ``--variant NAME
--memory``), so variants cannot inherit each other's heap. The subprocess loads the model, takes its
resident set size (VmRSS, /proc/self/status) after ``gc.collect()`` as the baseline, builds the variant
(adapt / get_peft_model + optimizer), then resets the kernel's RSS high-water mark (writes "5" to
/proc/self/clear_refs, so one-off transients of loading and of the PiSSA SVD do not count) and runs
``--warmup`` + ``--mem-steps`` training steps. Reported: peak = VmHWM − baseline, i.e. everything the
OS had to back for training on top of the loaded model: adapter parameters and buffers (PiSSA's frozen
A₀, B₀), gradients, AdamW state, saved activations, logits, and allocator/oneDNN scratch. RSS (rather
than torch.profiler's tensor accounting) is used because it is what actually limits a CPU run and it
sees non-tensor memory too; glibc may keep freed pages, which only ever counts against a variant.

Merged forward: the original model versus a copy adapted with svdkit PiSSA r16 (randomized), its
trainable factors perturbed slightly (A += 0.01·std(A)·N(0,1), B likewise, fixed seed), then
``svdkit.merge``d back into plain nn.Linear. Forward only under ``torch.no_grad()``, same batch,
``--warmup`` untimed then ``--rounds`` × ``--steps`` timed, round-robin; median and ratio.

Targets: svdkit LoRA ≤ 1.05× floor step time; svdkit PiSSA ≤ 1.10× floor; svdkit peak memory ≤ PEFT
LoRA's; merged forward ≤ 1.01× original.

Run:  .venv/bin/python benchmarks/train_overhead.py [--steps 5] [--rounds 3] [--warmup 2] [--rank 16]
          [--batch 4] [--seq 128] [--mem-steps 3] [--fused] [--out benchmarks/results/train_overhead.md]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import peft
import torch

import svdkit
from common import (provenance, LoadMeter, log, make_batch, malloc_trim, proc_status_kib, resident_model, reset_hwm,
                    verdict, write_report)
from svdkit.adapters.api import adapted_layers

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOOR = "frozen base (floor)"
SVD_LORA = "svdkit LoRA r{r}"
SVD_PISSA = "svdkit PiSSA r{r}"
SVD_PISSA_FOLD = "svdkit PiSSA r{r} fold=True"
FUSED = " fused"  # suffix: the same variant with input fusion on (svdkit's default is off)
PEFT_LORA = "PEFT LoRA r{r}"

# -- variants: each returns (model, optimizer or None) on the given (already copied) model ----------
def build(name: str, model, rank: int, lr: float):
    r = rank
    if name.endswith(FUSED):
        wrapped, opt = build(name[:-len(FUSED)], model, rank, lr)
        svdkit.fuse_shared_inputs(wrapped, True)
        return wrapped, opt
    if name == FLOOR:
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # forward hook: the embeddings' output requires grad
        wrapped, opt = model, None
    elif name == SVD_LORA.format(r=r):
        svdkit.adapt(model, svdkit.LoRA(rank=r), progress=False)
        wrapped = model
    elif name == SVD_PISSA.format(r=r):
        svdkit.adapt(model, svdkit.PiSSA(rank=r, svd="randomized"), progress=False)
        wrapped = model
    elif name == SVD_PISSA_FOLD.format(r=r):
        svdkit.adapt(model, svdkit.PiSSA(rank=r, svd="randomized", fold=True), progress=False)
        wrapped = model
    elif name == PEFT_LORA.format(r=r):
        cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=BLOCK_LINEARS, lora_dropout=0.0)
        wrapped = peft.get_peft_model(model, cfg)
    else:
        raise ValueError(f"unknown variant {name!r}")
    wrapped.train()
    if name != FLOOR:
        params = [p for p in wrapped.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)
    return wrapped, opt


def make_step(model, opt, ids: torch.Tensor):
    def step() -> None:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- memory (subprocess mode) ------------------------------------------------------------------------
def memory_child(args) -> None:
    """Run one variant in this (fresh) process and print one JSON line with its memory numbers."""
    model, ids, base_kib, trimmed = resident_model(args.batch, args.seq)
    hwm_reset = reset_hwm()
    wrapped, opt = build(args.variant, model, args.rank, args.lr)
    build_peak_kib = proc_status_kib("VmHWM") - base_kib  # transient peak of adapt / get_peft_model
    gc.collect()
    trimmed &= malloc_trim()  # glibc keeps the freed init scratch (stacked weights, SVD work) resident
    static_kib = proc_status_kib("VmRSS") - base_kib
    hwm_reset &= reset_hwm()
    step = make_step(wrapped, opt, ids)
    for _ in range(args.warmup + args.mem_steps):
        step()
    peak_kib = proc_status_kib("VmHWM") - base_kib
    print(json.dumps(dict(variant=args.variant, base_kib=base_kib, build_peak_kib=build_peak_kib,
                          static_kib=static_kib, peak_kib=peak_kib, hwm_reset=hwm_reset, trimmed=trimmed)))


def measure_memory(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", name, "--memory",
           "--rank", str(args.rank), "--batch", str(args.batch), "--seq", str(args.seq),
           "--warmup", str(args.warmup), "--mem-steps", str(args.mem_steps), "--lr", str(args.lr)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess for {name!r} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- main --------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the variants (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank (default 16)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--mem-steps", type=int, default=3,
                        help="training steps after warm-up in each memory subprocess (default 3)")
    parser.add_argument("--out", default="benchmarks/results/train_overhead.md", help="markdown report path")
    parser.add_argument("--fused", action="store_true",
                        help="also time svdkit LoRA and PiSSA with input fusion on (q/k/v, gate/up share GEMMs)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: the memory subprocess's variant
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key in ("steps", "rounds", "rank", "batch", "seq", "mem_steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.memory:
        if not args.variant:
            parser.error("--memory needs --variant")
        memory_child(args)
        return

    r = args.rank
    names = [FLOOR, SVD_LORA.format(r=r), SVD_PISSA.format(r=r), SVD_PISSA_FOLD.format(r=r), PEFT_LORA.format(r=r)]
    svd_names = names[1:4]
    peft_name = names[4]
    if args.fused:
        names += [SVD_LORA.format(r=r) + FUSED, SVD_PISSA.format(r=r) + FUSED]

    # 1. peak memory, one fresh subprocess per variant (before any model is resident here)
    mem = {}
    for name in names:
        if name.endswith(FUSED):  # fusion saves no more tensors than it replaces (tests/test_fusion.py)
            mem[name] = {k: float("nan") for k in ("build_peak_kib", "static_kib", "peak_kib")}
            mem[name].update(hwm_reset=True, trimmed=True)
            continue
        mem[name] = measure_memory(name, args)
        log(f"memory  {name:<22} init peak {mem[name]['build_peak_kib'] / 1024:8.1f} MiB  "
            f"resident {mem[name]['static_kib'] / 1024:8.1f} MiB  "
            f"peak {mem[name]['peak_kib'] / 1024:8.1f} MiB")

    # 2. step time, round-robin
    pristine, tok = svdkit.load_model("default")
    ids = make_batch(tok, args.batch, args.seq)
    n_layers = n_tokens = None
    runs = {}
    for name in names:
        model, opt = build(name, copy.deepcopy(pristine), r, args.lr)
        if name == svd_names[0]:
            n_layers = len(list(adapted_layers(model)))
        runs[name] = dict(step=make_step(model, opt, ids), trainable=trainable(model), model=model, opt=opt)
    n_tokens = ids.numel()
    for name in names:  # warm-up
        for _ in range(args.warmup):
            gc.collect()
            runs[name]["step"]()
    times: dict[str, list[float]] = {name: [] for name in names}
    sys_s: dict[str, list[float]] = {name: [] for name in names}  # kernel time per step (page faults, ...)
    cpu_s: dict[str, list[float]] = {name: [] for name in names}  # process CPU time (user + system) per step
    faults: dict[str, list[int]] = {name: [] for name in names}  # minor page faults per step
    train_load = LoadMeter()
    for rnd in range(args.rounds):
        for name in names:
            for _ in range(args.steps):
                gc.collect()
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                runs[name]["step"]()
                times[name].append(time.perf_counter() - t0)
                ru1 = resource.getrusage(resource.RUSAGE_SELF)
                sys_s[name].append(ru1.ru_stime - ru0.ru_stime)
                cpu_s[name].append(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime)
                faults[name].append(ru1.ru_minflt - ru0.ru_minflt)
            log(f"round {rnd + 1}/{args.rounds}  {name:<22} "
                f"median so far {statistics.median(times[name]):7.3f} s")
    train_busy = train_load.cores()
    trainables = {name: runs[name]["trainable"] for name in names}
    del runs, model, opt
    gc.collect()

    # 3. merged forward vs original
    original = copy.deepcopy(pristine).eval()
    merged = copy.deepcopy(pristine)
    svdkit.adapt(merged, svdkit.PiSSA(rank=r, svd="randomized"), progress=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in adapted_layers(merged):
            for p in (layer.lora_A, layer.lora_B):
                p.add_(0.01 * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        adapted_logits = merged(input_ids=ids, use_cache=False).logits
    svdkit.merge(merged)
    merged.eval()
    del pristine
    with torch.no_grad():
        orig_logits = original(input_ids=ids, use_cache=False).logits
        merged_logits = merged(input_ids=ids, use_cache=False).logits
    merge_err = (merged_logits - adapted_logits).abs().max().item()
    perturb = (merged_logits - orig_logits).abs().max().item()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in merged.modules())
    del adapted_logits, orig_logits, merged_logits
    fwd = {"original": original, "merged (svdkit PiSSA, perturbed)": merged}
    fwd_times: dict[str, list[float]] = {k: [] for k in fwd}

    def forward(m) -> None:
        with torch.no_grad():
            m(input_ids=ids, use_cache=False)

    for m in fwd.values():
        for _ in range(args.warmup):
            forward(m)
    fwd_load = LoadMeter()
    for rnd in range(args.rounds):
        for k, m in fwd.items():
            for _ in range(args.steps):
                gc.collect()
                t0 = time.perf_counter()
                forward(m)
                fwd_times[k].append(time.perf_counter() - t0)
        log(f"forward round {rnd + 1}/{args.rounds} done")

    fwd_busy = fwd_load.cores()

    # 4. report
    floor_med = statistics.median(times[FLOOR])
    floor_cpu = statistics.median(cpu_s[FLOOR])
    floor_peak = mem[FLOOR]["peak_kib"]
    rows = {}
    for name in names:
        med = statistics.median(times[name])
        rows[name] = dict(median=med, min=min(times[name]), ratio=med / floor_med,
                          sys=statistics.median(sys_s[name]), faults=statistics.median(faults[name]),
                          cpu=statistics.median(cpu_s[name]), cpu_ratio=statistics.median(cpu_s[name]) / floor_cpu,
                          build_peak=mem[name]["build_peak_kib"] / 1024,
                          static=mem[name]["static_kib"] / 1024, peak=mem[name]["peak_kib"] / 1024,
                          peak_ratio=mem[name]["peak_kib"] / floor_peak)
    fo, fm = (statistics.median(v) for v in fwd_times.values())
    fwd_ratio = fm / fo
    hwm_ok = all(m["hwm_reset"] for m in mem.values())
    trim_ok = all(m["trimmed"] for m in mem.values())

    lines = [
        f"# Training-step overhead, rank {r}, {n_layers} block linears of SmolLM2-135M-Instruct (fp32), "
        f"batch {args.batch} × {args.seq} tokens",
        "",
        *provenance(f"{args.rounds} rounds × {args.steps} steps after {args.warmup} warm-up, "
                    f"{args.warmup}+{args.mem_steps} steps per memory subprocess"),
        f"background load: other processes kept {train_busy:.2f} of {os.cpu_count()} cores busy on average "
        f"during the timed training steps, {fwd_busy:.2f} during the timed forwards"
        + (" — the machine was shared; compare ratios within this table only" if max(train_busy, fwd_busy) > 0.1
           else ""),
        "",
        "| variant | trainable params | median step (s) | min (s) | × floor | CPU time / step (s) | × floor (CPU) "
        "| kernel time / step (s) | minor page faults / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {trainables[name]:,} | {row['median']:.3f} | {row['min']:.3f} "
                     f"| {row['ratio']:.3f}× | {row['cpu']:.3f} | {row['cpu_ratio']:.3f}× | {row['sys']:.3f} "
                     f"| {row['faults']:,.0f} |")
    lines += [
        "",
        f"Step = forward + loss.backward() (+ AdamW(lr={args.lr:g}).step() + zero_grad(set_to_none=True) for "
        "the adapters); the floor is the frozen model with the embeddings' output requiring grad, so backward "
        f"crosses every layer. {n_tokens} tokens of a fixed English paragraph, labels = input_ids. CPU time = "
        "the process's user + system time per step (medians; with one thread it leaves out waiting for a core). "
        "Kernel "
        "time and minor page faults per step (getrusage, medians) show how much of a step the OS spends "
        "backing freshly allocated temporaries.",
        "",
        "| variant | init transient peak (MiB) | adapter resident (MiB) | training peak RSS (MiB) | × floor |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['build_peak']:.1f} | {row['static']:.1f} | {row['peak']:.1f} "
                     f"| {row['peak_ratio']:.2f}× |")
    lines += [
        "",
        "Memory, each variant in its own subprocess, all numbers above VmRSS of the loaded model (every weight "
        "page touched, glibc heap trimmed): init transient peak = VmHWM during adapt / get_peft_model (+ "
        "optimizer construction); adapter resident = VmRSS after it, once glibc's freed init scratch is "
        "handed back (malloc_trim); training peak = VmHWM over "
        f"{args.warmup}+{args.mem_steps} steps, the high-water mark reset just before them"
        + ("" if hwm_ok else " — WARNING: /proc/self/clear_refs was not writable, so the peaks include "
           "load/init transients")
        + ("" if trim_ok else " — WARNING: malloc_trim was unavailable, so freed init scratch may count") + ".",
        "",
        "| forward only, no grad | median (s) | min (s) | × original |",
        "|---|---:|---:|---:|",
    ]
    for k, v in fwd_times.items():
        lines.append(f"| {k} | {statistics.median(v):.3f} | {min(v):.3f} | {statistics.median(v) / fo:.3f}× |")
    lines += [
        "",
        f"Merged model: {n_linear} plain nn.Linear, max |logits − adapted model's logits| = {merge_err:.2e}, "
        f"max |logits − original's| = {perturb:.2e} (the perturbation is in the weights).",
        "",
        "Targets:",
        "",
    ]
    lim = {svd_names[0]: 1.05, svd_names[1]: 1.10, svd_names[2]: 1.10}
    for name in svd_names:
        row = rows[name]
        lines.append(f"- {name} step time ≤ {lim[name]:.2f}× floor (wall {row['ratio']:.3f}×: "
                     f"**{verdict(row['ratio'] <= lim[name])}**; CPU {row['cpu_ratio']:.3f}×: "
                     f"**{verdict(row['cpu_ratio'] <= lim[name])}**)")
    for name in svd_names:
        row, ref = rows[name], rows[peft_name]
        lines.append(f"- {name} peak memory ≤ {peft_name}'s ({row['peak']:.1f} vs {ref['peak']:.1f} MiB): "
                     f"**{verdict(row['peak'] <= ref['peak'])}**")
    lines.append(f"- merged forward ≤ 1.01× original ({fwd_ratio:.3f}×): **{verdict(fwd_ratio <= 1.01)}**")
    report = "\n".join(lines) + "\n"
    print(report)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
