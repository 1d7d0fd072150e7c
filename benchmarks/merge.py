"""Merging four task experts of the default model (SmolLM2-135M-Instruct) with every svdkit merge method.

Experts (``svdkit.training.finetune``, the code behind ``svdkit finetune``), one per task, each scored offline
by its held-out loss (the 10 % split finetune holds out, seed 0, never trained on):

  plus   generated arithmetic word problems, addition only      LoRA r=8          (PEFT folder input)
  times  generated arithmetic word problems, multiplication     LoRA r=8          (PEFT folder input)
  chat   chatterbot-corpus conversations                         LoRA r=8          (PEFT folder input)
  lee    lee_background news articles (continuation)             full fine-tuning  (svdkit adapter input)

all on the attention projections (q, k, v, o of the 30 layers: 120 matrices; keeps the CPU budget small).

Every merge method merges the same four inputs (LoRA-native methods through the LoRA factors). Per task the
score is the fraction of the expert's improvement the merge keeps, (L_base − L_merged) / (L_base − L_expert)
(1 = as good as the expert, 0 = no better than the base), on a test half of the held-out split; "avg" is the
mean over tasks. Two protocols: the data-free default (the config's defaults, α = 1), and a scale s of the
merged task vector chosen on the validation half from {0.5, 1, 1.5} (for every method but
cart and lore, s is exactly α; for those it scales their whole merged task vector). Merge time: one run each.

Memory (``--memory``): peak RSS (VmHWM) of a TSV-M merge of the four experts' merged checkpoints, streamed
folder → folder, against loading the base and the four models first and merging in memory; each in its own
process, one run each.

Run:  .venv/bin/python benchmarks/merge.py [--steps 10] [--examples 4] [--threads 1] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import log, proc_status_kib, provenance, reset_hwm, write_report  # noqa: E402

import torch  # noqa: E402

SCALES = (0.5, 1.0, 1.5)
TASKS = {"plus": "lora", "times": "lora", "chat": "lora", "lee": "full"}
MAX_LENGTH = 64


def task_data(work: Path) -> dict[str, str]:
    from svdkit.benchmarking.arithmetic import generate

    problems = generate(1200, seed=0)
    sources = {"chat": "chatterbot", "lee": "lee"}
    for op in ("plus", "times"):
        path = work / f"{op}.jsonl"
        rows = [json.dumps({"prompt": p["question"], "response": str(p["answer"])}) for p in problems if p["op"] == op]
        path.write_text("\n".join(rows) + "\n")
        sources[op] = str(path)
    return sources


def train_experts(work: Path, sources: dict, steps: int, heldout: int) -> dict[str, Path]:
    from svdkit.training.finetune import FinetuneConfig, finetune

    out = {}
    for task, method in TASKS.items():
        run = work / f"expert_{task}"
        if not (run / "eval.json").is_file():
            log(f"training the {task} expert ({method}, {steps} steps)…")
            cfg = FinetuneConfig(data=sources[task], method=method, rank=8 if method == "lora" else None, steps=steps,
                                 lr=1e-4 if method == "full" else None,  # the full-FT default 2e-5 barely moves in 20 steps
                                 batch_size=4, max_length=MAX_LENGTH, eval_every=10**6, checkpoint_every=10**6, samples=0,
                                 max_heldout=heldout, merge=True, method_options={"targets": "attention"})  # fmt: skip
            finetune(cfg, run, overwrite=True, progress=False, log=lambda *_: None)
        out[task] = run
    return out


def eval_sets(tok, sources: dict, n: int) -> dict[str, tuple[list, list]]:
    from svdkit.training import data

    sets = {}
    for task, source in sources.items():
        _, heldout = data.split(data.load_examples(source, tok, max_length=MAX_LENGTH), 0.1, 0)
        sets[task] = (heldout[:n], heldout[n:2 * n])
    return sets


def losses(model, sets, split: int, pad_id: int) -> dict[str, float]:
    from svdkit.training.batches import eval_loss

    return {task: eval_loss(model, s[split], 8, pad_id)[0] for task, s in sets.items()}


def normalized(merged: dict, base: dict, expert: dict) -> dict[str, float]:
    out = {t: (base[t] - merged[t]) / (base[t] - expert[t]) for t in merged}
    out["avg"] = sum(out.values()) / len(merged)
    return out


def memory_probe(mode: str, work: Path) -> None:
    """One merge in this process; prints JSON with the peak RSS (VmHWM) and the time."""
    import svdkit
    from svdkit.core.models import default_model_dir, load_model

    import threading

    experts = [str(work / f"expert_{t}" / "merged") for t in TASKS]
    base = str(default_model_dir())
    anon, done = [0], threading.Event()

    def sample():  # RssAnon: private memory; VmHWM also counts the touched pages of memory-mapped files
        while not done.wait(0.02):
            anon[0] = max(anon[0], proc_status_kib("RssAnon"))

    threading.Thread(target=sample, daemon=True).start()
    reset_hwm()
    start = time.perf_counter()
    cfg = svdkit.config("tsv-m")
    if mode == "stream":
        svdkit.merge_models(base, experts, cfg, out=work / "memory_out", overwrite=True, progress=False)
    else:
        models = [load_model(p)[0] for p in [base, *experts]]
        svdkit.merge_models(models[0], models[1:], cfg, progress=False)
    seconds = time.perf_counter() - start
    done.set()
    print(json.dumps({"mode": mode, "peak_mib": proc_status_kib("VmHWM") / 1024, "peak_anon_mib": anon[0] / 1024, "seconds": seconds}))


def memory_table(work: Path) -> list[str]:
    rows = []
    for mode in ("stream", "load"):
        cmd = [sys.executable, __file__, "--memory-probe", mode, "--work", str(work), "--threads", str(torch.get_num_threads())]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    size = sum(p.stat().st_size for p in (work / "expert_plus" / "merged").glob("*.safetensors")) / 2**20
    lines = ["| TSV-M of 4 experts | peak private memory, RssAnon (MiB) | peak RSS incl. mapped files, VmHWM (MiB) | time (s) |",
             "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {'streamed folder → folder' if r['mode'] == 'stream' else 'all 5 models loaded, merged in memory'} | "
              f"{r['peak_anon_mib']:.0f} | {r['peak_mib']:.0f} | {r['seconds']:.1f} |" for r in rows]  # fmt: skip
    lines.append(f"\nOne checkpoint is {size:.0f} MiB (fp32). Streaming / loading peak private memory: "
                 f"{rows[0]['peak_anon_mib'] / rows[1]['peak_anon_mib']:.2f}. RssAnon is sampled every 20 ms; VmHWM "
                 "also counts the pages of the memory-mapped inputs the merge has read, which the kernel can drop at any time.")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--examples", type=int, default=4, help="validation and test examples per task")
    p.add_argument("--work", default="/tmp/svdkit_merge_bench")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every merge method)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared, oversubscribed CPU, 2 threads ran 6× slower)")
    p.add_argument("--memory", action="store_true", help="also measure streaming vs loading peak memory")
    p.add_argument("--memory-probe", choices=["stream", "load"], help=argparse.SUPPRESS)
    p.add_argument("--rows-out", help="write this part's rows as JSON instead of the table (parallel parts)")
    p.add_argument("--combine", help="comma-separated --rows-out files: write the table from them")
    p.add_argument("--memory-only", action="store_true", help="only the memory table (experts already trained in --work)")
    p.add_argument("--out", default="benchmarks/results/merge.md")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args.memory_probe, work)
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine.split(",")]
        rows = {k: v for part in parts for k, v in part["rows"].items()}
        for r in rows.values():
            r["scale"] = float(r["scale"])
        return write(args, rows, parts[0]["base"], parts[0]["expert"], parts[0]["train_time"], memory_table(work) if args.memory else None)
    if args.memory_only:
        text = "\n".join(["## Streaming memory", "", *provenance("one run per mode"), "", *memory_table(work)]) + "\n"
        print(text)
        return write_report(args.out, text)

    import svdkit
    from svdkit.core.models import load_model

    torch.manual_seed(0)
    sources = task_data(work)
    t0 = time.perf_counter()
    experts = train_experts(work, sources, args.steps, 2 * args.examples)
    train_time = time.perf_counter() - t0
    base, tok = load_model("default")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sets = eval_sets(tok, sources, args.examples)
    base_loss = [losses(base, sets, s, pad_id) for s in (0, 1)]
    expert_loss = [{}, {}]
    for task, run in experts.items():
        model = load_model(run / "merged")[0]
        for s in (0, 1):
            expert_loss[s][task] = losses(model, sets, s, pad_id)[task]
        del model
    inputs = [str(experts[t] / ("peft" if m == "lora" else "adapter")) for t, m in TASKS.items()]
    names = args.methods.split(",") if args.methods else [n for n in svdkit.methods("merge") if not getattr(svdkit.method_class(n), "delta_compression", False)]
    W0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    rows = {}
    for name in names:
        cfg = svdkit.config(name)
        log(f"merging with {name}…")
        start = time.perf_counter()
        merged = svdkit.merge_models(None if cfg.base_free else base, inputs if not cfg.base_free else [str(experts[t] / "merged") for t in TASKS],
                                     cfg, progress=False)  # fmt: skip
        seconds = time.perf_counter() - start
        M = {k: v.detach().clone() for k, v in merged.state_dict().items()}
        params = merged.state_dict()

        def at(scale):
            with torch.no_grad():
                for k, v in params.items():
                    if v.dtype.is_floating_point:
                        v.copy_(W0[k] + scale * (M[k] - W0[k]))

        default = normalized(losses(merged, sets, 1, pad_id), base_loss[1], expert_loss[1])
        val = {}
        for s in SCALES:
            at(s)
            val[s] = normalized(losses(merged, sets, 0, pad_id), base_loss[0], expert_loss[0])["avg"]
        best = max(val, key=val.get)
        at(best)
        tuned = normalized(losses(merged, sets, 1, pad_id), base_loss[1], expert_loss[1])
        rows[name] = {"default": default, "scale": best, "tuned": tuned, "seconds": seconds}
        log(f"  {name}: default avg {default['avg']:.3f}, tuned (s={best}) avg {tuned['avg']:.3f}, {seconds:.1f} s")
        del merged, M, params
    if args.rows_out:  # a part of the methods: combine the parts with --combine
        Path(args.rows_out).write_text(json.dumps({"rows": rows, "base": base_loss[1], "expert": expert_loss[1], "train_time": train_time}))
        return
    write(args, rows, base_loss[1], expert_loss[1], train_time, memory_table(work) if args.memory else None)


def write(args, rows, base_loss, expert_loss, train_time, memory) -> None:
    tasks = list(TASKS)
    lines = ["# Merging four task experts of SmolLM2-135M-Instruct", "", *provenance(
        f"experts: {args.steps} steps each ({train_time / 60:.1f} min incl. evaluation), {args.examples} val + {args.examples} test examples per task"), "",
        "Score = fraction of the expert's held-out loss improvement kept: (L_base − L_merged)/(L_base − L_expert). "
        "Test half; the scale s of the merged task vector is chosen on the validation half.", "",
        "| task | base loss | expert loss | expert |", "|---|---:|---:|---|"]  # fmt: skip
    lines += [f"| {t} | {base_loss[t]:.3f} | {expert_loss[t]:.3f} | {'LoRA r=8 (PEFT)' if TASKS[t] == 'lora' else 'full FT (svdkit adapter)'} |" for t in tasks]
    head = " | ".join(tasks)
    lines += ["", f"| method | {head} | avg (default α) | s (val) | {head} | avg (val-chosen s) | merge time (s) |",
              "|---|" + "---:|" * (2 * len(tasks) + 4)]  # fmt: skip
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1]["tuned"]["avg"]):
        d, t = r["default"], r["tuned"]
        lines.append(f"| {name} | " + " | ".join(f"{d[x]:.2f}" for x in tasks) + f" | **{d['avg']:.3f}** | {r['scale']:g} | "
                     + " | ".join(f"{t[x]:.2f}" for x in tasks) + f" | **{t['avg']:.3f}** | {r['seconds']:.1f} |")  # fmt: skip
    want = ["tsv-m", "iso-cts", "ties", "task-arithmetic"]
    if all(w in rows for w in want):
        for proto in ("default", "tuned"):
            s = {w: rows[w][proto]["avg"] for w in want}
            holds = min(s["tsv-m"], s["iso-cts"]) > s["ties"] > s["task-arithmetic"]
            lines.append(f"\nPapers' ordering TSV-M ≈ Iso-CTS > TIES > task arithmetic ({proto}): "
                         f"{'holds' if holds else 'does not hold'} here ({', '.join(f'{k} {v:.3f}' for k, v in s.items())}).")  # fmt: skip
    if memory:
        lines += ["", "## Streaming memory", "", *memory]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
