"""Low-rank-gradient optimizers, training a small Llama from scratch on offline English text (`svdkit pretrain
--size bench`): validation perplexity, optimizer-state bytes, peak memory and step time at equal steps and tokens.

Every run is a separate `svdkit pretrain` process (so its peak RSS is its own) on one thread
(OMP_NUM_THREADS=1: on a shared 2-core machine one thread is faster than two for this model), sequentially.
Results accumulate in benchmarks/results/pretrain.json (re-running a subset replaces those runs); the table is
rebuilt from all of them. ``--spike`` adds GaLore with each on_switch rule and reports the loss jump at the
subspace refreshes (every method sees the same batches, so the jumps are paired across rules).

    .venv/bin/python benchmarks/pretrain.py                       # the main table (2 seeds for the core rows)
    .venv/bin/python benchmarks/pretrain.py --rows sst lost       # add rows
    .venv/bin/python benchmarks/pretrain.py --spike               # on_switch: keep / reset / rotate
    .venv/bin/python benchmarks/pretrain.py --finetune            # default model: full AdamW vs GaLore vs LoRA r16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
from common import log, provenance, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# label: (optimizer, extra CLI options, seeds)
ROWS = {
    "adamw lr1e-3": ("adamw", ["--lr", "1e-3"], (0, 1)),
    "adamw lr3e-3": ("adamw", ["--lr", "3e-3"], (0, 1)),
    "adamw lr1e-2": ("adamw", ["--lr", "1e-2"], (0, 1)),
    "galore (svd)": ("galore", ["--on-switch", "rotate"], (0, 1)),
    "galore r128 = full rank (control)": ("galore", ["--rank", "128", "--on-switch", "rotate"], (0,)),
    "galore randomized": ("galore", ["--projection", "randomized", "--on-switch", "rotate"], (0,)),
    "galore dct": ("galore-dct", ["--on-switch", "rotate"], (0,)),
    "galore random": ("galore", ["--projection", "random", "--on-switch", "rotate"], (0,)),
    "osd (online-pca)": ("osd", [], (0,)),
    "q-galore": ("q-galore", ["--on-switch", "rotate"], (0,)),
    "galore-plus": ("galore-plus", ["--on-switch", "rotate", "--residual-density", "0"], (0, 1)),  # seed 0 ran before the residual existed
    "galore-plus + residual 1%": ("galore-plus", ["--on-switch", "rotate"], (0, 1)),  # the default residual_density 0.01
    "lora r32": ("lora", ["--lr", "3e-3"], (0, 1)),
    "muon": ("muon", ["--lr", "3e-3"], (0, 1)),
    "sst": ("sst", [], (0,)),
    "lost": ("lost", [], (0,)),
}
# the GaLore-family rows above ran with on_switch=rotate (the default then): "galore (svd)" is the rotate run
SPIKE = {f"galore on_switch={m}": ("galore", ["--on-switch", m], (0, 1)) for m in ("keep", "reset")}
MAIN = [k for k in ROWS if k not in ("sst", "lost", "adamw lr1e-2", "galore r128 = full rank (control)")]


def run(label: str, optimizer: str, options: list[str], seed: int, work: Path, cache: str, steps: int | None) -> dict:
    out = work / f"{label.replace(' ', '_').replace('=', '-')}-s{seed}"
    cmd = [sys.executable, "-m", "svdkit", "pretrain", "--optimizer", optimizer, "--size", "bench", "--seed", str(seed),
           "--cache", cache, "--out", str(out), "--overwrite", *options] + (["--steps", str(steps)] if steps else [])  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} seed {seed} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "eval.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"label": label, "seed": seed, "command": " ".join(cmd[2:]), "wall_s": round(time.time() - start, 1),
            "heldout_loss": summary["heldout"]["loss"], "heldout_ppl": summary["heldout"]["perplexity"],
            "state_bytes": summary["optimizer_state_bytes"], "memory_report": summary["memory_report"],
            "peak_rss_mib": summary["peak_rss_mib"], "median_step_s": summary["train"]["median_step_s"],
            "trainable": summary["trainable_parameters"], "parameters": summary["parameters"],
            "update_gap": summary["method_config"].get("update_gap"), "rank": summary["method_config"].get("rank"),
            "steps": summary["steps"], "tokens": summary["tokens"], "losses": losses}  # fmt: skip


FINETUNE = {  # label: svdkit finetune options (the default model and data, batches of 8 examples)
    "full AdamW lr2e-5": ["--method", "full", "--lr", "2e-5"],
    "full GaLore r128 lr8e-5": ["--method", "full", "--optimizer", "galore", "--lr", "8e-5"],
    "LoRA r16 (method default lr)": ["--method", "lora", "--rank", "16"],
}


def finetune_run(label: str, options: list[str], work: Path, steps: int) -> dict:
    """One `svdkit finetune` process (one thread): held-out loss before/after on the same 64 held-out examples,
    optimizer-state bytes read back from its (pickle-free) checkpoint, the process's own peak RSS and CPU
    seconds (os.wait4's rusage of that child), median step time."""
    from svdkit.core.checkpoint import load_state

    out = work / ("ft-" + label.split(" (")[0].replace(" ", "_"))
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "svdkit", "finetune", "--steps", str(steps), "--eval-every", str(steps), "--samples", "1",
           "--checkpoint-every", str(steps), "--out", str(out), "--overwrite", *options]  # fmt: skip
    with open(work / (out.name + ".log"), "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"), stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{label} failed: see {work / (out.name + '.log')}")
    summary = json.loads((out / "eval.json").read_text())
    state = load_state(out / "checkpoint")["optimizer"]["state"]
    nbytes = sum(v.numel() * v.element_size() for st in state.values() for v in st.values() if hasattr(v, "numel"))
    return {"label": label, "command": " ".join(cmd[2:]), "steps": steps, "before": summary["before"]["loss"],
            "after": summary["after"]["loss"], "heldout_examples": summary["heldout_examples"], "state_bytes": nbytes,
            "trainable": summary["trainable_parameters"], "median_step_s": summary["train"]["median_step_s"],
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}  # fmt: skip


def finetune_table(runs: list[dict]) -> str:
    lines = ["| run | steps | held-out loss before → after | optimizer state MiB | peak RSS MiB | trainable params | "
             "step s (median; sequential, loaded machine) | CPU s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['label']} | {r.get('steps', 30)} | {r['before']:.4f} → {r['after']:.4f} | {r['state_bytes'] / 2**20:.1f} | "
              f"{r.get('peak_rss_mib', '')} | {r['trainable']:,} | {r['median_step_s']} | {r.get('cpu_s', '')} |" for r in runs]  # fmt: skip
    return "\n".join(lines)


def finetune_step_times(rounds: int = 3, steps: int = 3) -> str:
    """optimizer.step() alone on the default model, side by side in one process and one thread, fixed random
    gradients: AdamW on the full-fine-tuning weights, GaLore (rank 128) on the same weights, AdamW on LoRA r16's
    adapters; interleaved round by round (median ms over rounds). GaLore's first step (its SVD refresh of every
    matrix) is timed on its own."""
    import torch

    import svdkit
    from svdkit import optim
    from svdkit.core.models import load_model

    torch.set_num_threads(1)
    setups = {}
    for label, method in (("full", "full"), ("lora", "lora")):
        model = svdkit.adapt(load_model("default")[0], svdkit.config(method, **({"rank": 16} if method == "lora" else {})))
        params = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        if label == "full":
            setups["full AdamW"] = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)
            setups["full GaLore r128"] = optim.build(params, svdkit.config("galore"), lr=8e-5)
        else:
            setups["LoRA r16 AdamW"] = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    start = time.perf_counter()
    setups["full GaLore r128"].step()
    refresh_ms = (time.perf_counter() - start) * 1e3
    times = {label: [] for label in setups}
    for _ in range(rounds):
        for label, opt in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[label].append((time.perf_counter() - start) / steps * 1e3)
    base = statistics.median(times["full AdamW"])
    lines = ["| optimizer | optimizer.step() ms (median of rounds) | / full AdamW | state MiB |", "|---|---|---|---|"]
    for k, v in times.items():
        from svdkit.optim import state_bytes

        lines.append(f"| {k} | {statistics.median(v):.0f} | {statistics.median(v) / base:.2f} | {state_bytes(setups[k]) / 2**20:.0f} |")
    lines.append(f"| full GaLore r128, first step (SVD of all 210 matrices) | {refresh_ms:.0f} | {refresh_ms / base:.2f} | |")
    return "\n".join(lines)


STEP_TIME = {"adamw": ("adamw", {}), "galore (svd)": ("galore", {}), "galore randomized": ("galore", {"projection": "randomized"}),
             "galore dct": ("galore-dct", {}), "galore random": ("galore", {"projection": "random"}), "osd": ("osd", {}),
             "q-galore": ("q-galore", {}), "galore-plus": ("galore-plus", {}), "muon": ("muon", {}), "sst": ("sst", {}),
             "lost": ("lost", {})}  # fmt: skip


def step_times(rounds: int = 5, steps: int = 15) -> str:
    """optimizer.step() alone on the bench model with fixed gradients, every optimizer interleaved round by round
    (so machine load hits them alike): median ms per step over rounds of ``steps`` steps (one refresh each)."""
    import torch

    from svdkit import optim
    from svdkit.training.pretrain import SIZES, VOCAB, PretrainConfig, build_model

    torch.set_num_threads(1)
    tier, setups = dict(SIZES["bench"]), {}
    for label, (name, opts) in STEP_TIME.items():
        model = build_model(tier, VOCAB, 0)
        cfg = PretrainConfig(optimizer=name, size="bench", optimizer_options=opts, update_gap=steps).method_config()
        if getattr(cfg, "parametrizes", False):
            optim.parametrize(model, cfg)
        opt = optim.build(model, cfg, lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        setups[label] = opt
    times = {label: [] for label in setups}
    for _ in range(rounds):
        for label, opt in setups.items():
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times[label].append((time.perf_counter() - start) / steps * 1e3)
    base = statistics.median(times["adamw"])
    lines = ["| optimizer | optimizer.step() ms (median of rounds) | / AdamW |", "|---|---|---|"]
    lines += [f"| {k} | {statistics.median(v):.2f} | {statistics.median(v) / base:.2f} |" for k, v in times.items()]
    return "\n".join(lines)


def refresh_jump(r: dict) -> float | None:
    """Mean train-loss change across a refresh. Step t (0-based) refreshes when t % T == 0 and its update is the
    first in the new basis, so losses[t + 1] (measured before step t + 1's update) is the first loss that sees it:
    jump = losses[t + 1] − losses[t], averaged over t = T, 2T, …"""
    T, losses = r.get("update_gap"), r["losses"]
    if not T:
        return None
    jumps = [losses[t + 1] - losses[t] for t in range(T, len(losses) - 1, T)]
    return statistics.fmean(jumps) if jumps else None


def table(results: list[dict]) -> str:
    by = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)
    lines = ["| run | seeds | held-out ppl (each seed) | mean ppl | optimizer state MiB | Q-GaLore quantized MiB | peak RSS MiB | "
             "train step s (median; sequential runs, load varied: not a ratio) | trainable params |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    order = [k for k in (*ROWS, *SPIKE) if k in by]  # (the on_switch runs also get a row of their own)
    for label in order:
        rs = sorted(by[label], key=lambda r: r["seed"])
        ppls = [r["heldout_ppl"] for r in rs]
        step = statistics.median(r["median_step_s"] for r in rs)
        mem = rs[0]["memory_report"]
        q = f"{mem['quantized_state_bytes'] / 2**20:.2f} (+{mem['weight_bytes_saved'] / 2**20:.2f} weights)" if mem["weight_bytes_saved"] else ""
        lines.append(f"| {label} | {len(rs)} | {' / '.join(f'{p:.1f}' for p in ppls)} | {statistics.fmean(ppls):.1f} | "
                     f"{rs[0]['state_bytes'] / 2**20:.2f} | {q} | {max(r['peak_rss_mib'] for r in rs):.0f} | {step:.3f} | "
                     f"{rs[0]['trainable']:,} |")  # fmt: skip
    rules = {label.split("=")[1]: by[label] for label in SPIKE if label in by}
    if rules and "galore (svd)" in by:
        rules["rotate"] = by["galore (svd)"]
    if rules:
        lines += ["", "GaLore's on_switch rules (same batches for every rule; the loss jump is the mean over refreshes t = T·j of "
                  "loss[t + 1] − loss[t], averaged over seeds; lower is a smaller spike):", "",
                  "| on_switch | seeds | mean jump at refreshes (nats) | held-out ppl (each seed) | mean ppl |", "|---|---|---|---|---|"]  # fmt: skip
        for rule, rs in rules.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            jump = statistics.fmean(refresh_jump(r) for r in rs)
            ppls = [r["heldout_ppl"] for r in rs]
            lines.append(f"| {rule} | {len(rs)} | {jump:+.4f} | {' / '.join(f'{p:.1f}' for p in ppls)} | {statistics.fmean(ppls):.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="*", default=None, help=f"rows to run (default: {', '.join(MAIN)})")
    p.add_argument("--spike", action="store_true", help="run GaLore with on_switch keep / reset / rotate")
    p.add_argument("--finetune", action="store_true", help="the fine-tuning rows (default model and data)")
    p.add_argument("--finetune-steps", type=int, default=20, help="optimizer steps of each fine-tuning run")
    p.add_argument("--finetune-step-time", action="store_true", help="optimizer.step() alone on the default model, side by side")
    p.add_argument("--seed", type=int, default=None, help="run only this seed of each row")
    p.add_argument("--step-time", action="store_true", help="time optimizer.step() side by side (interleaved)")
    p.add_argument("--table-only", action="store_true", help="rebuild the table from the stored runs, run nothing")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the bench tier's)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "svdkit" / "pretrain"))
    p.add_argument("--work", default="/tmp/svdkit-bench-pretrain", help="run folders")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretrain.md"))
    args = p.parse_args()
    rows = {**ROWS, **SPIKE}
    wanted = [] if args.table_only else list(SPIKE) if args.spike else (args.rows or MAIN)
    store = Path(args.out).with_suffix(".json")
    saved = json.loads(store.read_text()) if store.is_file() else {}
    results, ft_runs, steps_md = saved.get("runs", []), saved.get("finetune", []), saved.get("step_time", "")
    ft_steps_md = saved.get("finetune_step_time", "")
    if args.step_time:
        wanted, steps_md = [], step_times()
        write_report(str(store), json.dumps({"runs": results, "finetune": ft_runs, "step_time": steps_md, "finetune_step_time": ft_steps_md}, indent=1) + "\n")
    if args.finetune_step_time:
        wanted, ft_steps_md = [], finetune_step_times()
        write_report(str(store), json.dumps({"runs": results, "finetune": ft_runs, "step_time": steps_md, "finetune_step_time": ft_steps_md}, indent=1) + "\n")
    if args.finetune:
        wanted = []
        for label, options in FINETUNE.items():
            log(f"finetune {label} ...")
            ft_runs = [r for r in ft_runs if r["label"] != label] + [finetune_run(label, options, Path(args.work), args.finetune_steps)]
            write_report(str(store), json.dumps({"runs": results, "finetune": ft_runs, "step_time": steps_md, "finetune_step_time": ft_steps_md}, indent=1) + "\n")
    for label in wanted:
        optimizer, options, seeds = rows[label]
        for seed in seeds if args.seed is None else [x for x in seeds if x == args.seed]:
            log(f"{label} seed {seed} ...")
            r = run(label, optimizer, options, seed, Path(args.work), args.cache, args.steps)
            log(f"  held-out ppl {r['heldout_ppl']:.2f}, {r['median_step_s']} s/step, {r['wall_s']} s")
            results = [x for x in results if (x["label"], x["seed"]) != (label, seed)] + [r]
            write_report(str(store), json.dumps({"runs": results, "finetune": ft_runs, "step_time": steps_md, "finetune_step_time": ft_steps_md}, indent=1) + "\n")
    text = "\n".join(["# svdkit pretrain --size bench: optimizers at equal steps and tokens", "",
                      *provenance(f"rows run by this invocation: {', '.join(wanted) or 'see pretrain.json'}; per-run commands in pretrain.json"), "", table(results), ""]
                     + (["## Fine-tuning the default model on the default data (batches of 8 examples)", "", finetune_table(ft_runs), ""]
                        if ft_runs else [])
                     + (["## Fine-tuning: optimizer.step() alone on the default model, side by side", "", ft_steps_md, ""]
                        if ft_steps_md else [])
                     + (["## optimizer.step() alone, side by side (bench model, fixed gradients, one refresh per 15 steps)", "",
                         steps_md, ""] if steps_md else []))  # fmt: skip
    write_report(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
