"""Merging four task experts of the default model (SmolLM2-135M-Instruct) with every svdkit merge method.

Two families of experts (``svdkit.training.finetune``, the code behind ``svdkit finetune``), one expert per
task and family, all on the q and v projections of the 30 layers (60 matrices, the LoRA paper's targets; it
keeps the CPU budget of the SVD methods small):

  lora   LoRA r=8, lr 5e-4          merge input: the PEFT folder (KnOTS / Core Space merge the factors)
  full   full fine-tuning, lr 1e-4  merge input: the svdkit adapter folder (dense task vectors)

Tasks, each scored offline by its loss on held-out examples (the 10 % split finetune holds out, never
trained on, split into a validation and a test half):

  plus   generated arithmetic word problems, addition only (svdkit.benchmarking.arithmetic)
  times  generated arithmetic word problems, multiplication only
  chat   chatterbot-corpus conversations
  lee    lee_background news articles (continuation)

Each family's four experts are merged by every merge method (LoRE, base-free, gets the experts' merged
checkpoints and no base). Per task the score is the fraction of the expert's improvement the merge keeps,
(L_base − L_merged) / (L_base − L_expert): 1 = as good as the task's own expert, 0 = no better than the
base; "avg" is the mean over tasks. Two protocols: the data-free default (the config's defaults, α = 1),
and a scale s of the merged task vector chosen on the validation half from {0.5, 1, 2}, extended by doubling
(halving) while the best s is the largest (smallest) scored, within [0.125, 32] (for every method but
cart and lore s multiplies α exactly; for those it scales their whole merged task vector θ − θ₀), reported
on the test half. Merge time and memory: one in-memory merge per method (the base model already loaded);
memory = the peak private memory (RssAnon, sampled every 20 ms) above what the process held before.

Experts are cached in --work (a stamp of their settings: changing a setting retrains) and so are the
finished rows (--fresh drops them), so an interrupted run continues where it stopped; ``--report`` writes
the table from the rows finished so far. Methods run in the order TA, TIES, TSV-M, Iso-CTS, the rest, LoRE
(the slowest: 10 rounds of T SVDs per matrix) last. The in-memory merge's memory includes its copy of the base.

Memory (``--memory``): peak RSS of a TSV-M merge of the full-FT experts' merged checkpoints, streamed folder →
folder, against loading the base and the four models first; each in its own process, one run each.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/merge.py [--steps 20] [--examples 12] [--families lora,full]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import log, malloc_trim, proc_status_kib, provenance, reset_hwm, write_report  # noqa: E402

import torch  # noqa: E402

SCALES = (0.5, 1.0, 2.0)  # the starting grid of s; extended by doubling / halving past an edge …
SCALE_CAP = (0.125, 32.0)  # … up to these bounds ("capped" in the table when the best s is one of them)
TASKS = ("plus", "times", "chat", "lee")
FAMILIES = {"lora": {"method": "lora", "rank": 8, "lr": 5e-4, "input": "peft"},
            "full": {"method": "full", "rank": None, "lr": 1e-4, "input": "adapter"}}  # fmt: skip
TARGETS = r"\.(q_proj|v_proj)$"
MAX_LENGTH = 64


def task_data(work: Path) -> dict[str, str]:
    from svdkit.benchmarking.arithmetic import generate

    problems = generate(2000, seed=0)
    sources = {"chat": "chatterbot", "lee": "lee"}
    for op in ("plus", "times"):
        path = work / f"{op}.jsonl"
        rows = [json.dumps({"prompt": p["question"], "response": str(p["answer"])}) for p in problems if p["op"] == op]
        path.write_text("\n".join(rows) + "\n")
        sources[op] = str(path)
    return sources


def train_experts(work: Path, family: str, sources: dict, args) -> dict[str, Path]:
    from svdkit.training.finetune import FinetuneConfig, finetune

    spec, out = FAMILIES[family], {}
    for task in TASKS:
        run = work / f"{family}_{task}"
        cfg = FinetuneConfig(data=sources[task], method=spec["method"], rank=spec["rank"], lr=spec["lr"], steps=args.steps,
                             batch_size=4, max_length=MAX_LENGTH, eval_every=10**6, checkpoint_every=10**6, samples=0,
                             max_heldout=2 * args.examples, merge=True, seed=args.seed, method_options={"targets": TARGETS})  # fmt: skip
        stamp = json.dumps({"steps": args.steps, "examples": args.examples, "seed": args.seed, **spec, "targets": TARGETS}, sort_keys=True)
        if not ((run / "eval.json").is_file() and (run / "bench_stamp.json").is_file() and (run / "bench_stamp.json").read_text() == stamp):
            log(f"training the {family} {task} expert ({args.steps} steps)…")
            t0 = time.perf_counter()
            finetune(cfg, run, overwrite=True, progress=False, log=lambda *_: None)
            (run / "bench_stamp.json").write_text(stamp)
            (run / "bench_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}")
        out[task] = run
    return out


def eval_sets(tok, sources: dict, n: int, seed: int) -> dict[str, tuple[list, list]]:
    """Per task (validation, test): the first 2n examples of the held-out split finetune made with ``seed``."""
    from svdkit.training import data

    sets = {}
    for task, source in sources.items():
        _, heldout = data.split(data.load_examples(source, tok, max_length=MAX_LENGTH), 0.1, seed)
        if len(heldout) < 2 * n:
            raise SystemExit(f"{task}: only {len(heldout)} held-out examples, fewer than 2 × --examples {n}.")
        sets[task] = (heldout[:n], heldout[n:2 * n])
    return sets


def losses(model, sets, split: int, pad_id: int) -> dict[str, float]:
    from svdkit.training.batches import eval_loss

    return {task: eval_loss(model, s[split], 8, pad_id)[0] for task, s in sets.items()}


def normalized(merged: dict, base: dict, expert: dict) -> dict[str, float]:
    out = {t: (base[t] - merged[t]) / (base[t] - expert[t]) for t in merged}
    out["avg"] = sum(out.values()) / len(merged)
    return out


class PeakAnon:
    """Peak RssAnon (private memory) above its value at entry, sampled every 20 ms in a thread."""

    def __enter__(self):
        gc.collect()
        malloc_trim()
        self.start = self.peak = proc_status_kib("RssAnon")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.02):
            self.peak = max(self.peak, proc_status_kib("RssAnon"))

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.mib = (self.peak - self.start) / 1024
        return False


def run_family(family: str, work: Path, sources: dict, args, rows: dict, base, tok, sets, pad_id) -> dict:
    import svdkit
    from svdkit.core.models import load_model

    experts = train_experts(work, family, sources, args)
    if f"{family}/losses" not in rows:
        base_loss = [losses(base, sets, s, pad_id) for s in (0, 1)]
        expert_loss = [{}, {}]
        for task, run in experts.items():
            model = load_model(run / "merged")[0]
            for s in (0, 1):
                expert_loss[s][task] = losses(model, {task: sets[task]}, s, pad_id)[task]
            del model
        seconds = {t: float((r / "bench_seconds.txt").read_text()) for t, r in experts.items() if (r / "bench_seconds.txt").is_file()}
        rows[f"{family}/losses"] = {"base": base_loss, "expert": expert_loss, "train_seconds": seconds}
        save_rows(args, rows)
    base_loss, expert_loss = rows[f"{family}/losses"]["base"], rows[f"{family}/losses"]["expert"]
    inputs = [str(experts[t] / FAMILIES[family]["input"]) for t in TASKS]
    checkpoints = [str(experts[t] / "merged") for t in TASKS]
    if args.methods:
        names = args.methods.split(",")  # in the order given
    else:  # the papers' chain first, LoRE (the slowest) last
        names = [n for n in svdkit.methods("merge") if not getattr(svdkit.method_class(n), "delta_compression", False)]
        names.sort(key=lambda n: (n == "lore", ORDER.index(n) if n in ORDER else len(ORDER), n))
    W0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for name in names:
        if f"{family}/{name}" in rows:
            continue
        cfg = svdkit.config(name)
        log(f"[{family}] merging with {name}…")
        with PeakAnon() as mem:
            start = time.perf_counter()
            merged = svdkit.merge_models(None if cfg.base_free else base, checkpoints if cfg.base_free else inputs, cfg, progress=False)
            seconds = time.perf_counter() - start
        params = merged.state_dict()
        D = {k: (v.detach() - W0[k]) for k, v in params.items() if v.dtype.is_floating_point and not torch.equal(v, W0[k])}

        def at(scale):
            with torch.no_grad():
                for k, d in D.items():
                    params[k].copy_(W0[k] + scale * d)

        val = {1.0: normalized(losses(merged, sets, 0, pad_id), base_loss[0], expert_loss[0])}
        default = normalized(losses(merged, sets, 1, pad_id), base_loss[1], expert_loss[1])
        s = SCALES[0]
        while s is not None:
            if s not in val:
                at(s)
                val[s] = normalized(losses(merged, sets, 0, pad_id), base_loss[0], expert_loss[0])
            s = next_scale({k: v["avg"] for k, v in val.items()})
        best = max(val, key=lambda s: val[s]["avg"])
        at(best)
        tuned = default if best == 1.0 else normalized(losses(merged, sets, 1, pad_id), base_loss[1], expert_loss[1])
        rows[f"{family}/{name}"] = {"default": default, "scale": best, "val": {str(s): v["avg"] for s, v in val.items()},
                                    "tuned": tuned, "seconds": seconds, "memory_mib": mem.mib, "changed": len(D)}  # fmt: skip
        save_rows(args, rows)
        log(f"  {name}: default avg {default['avg']:.3f}, tuned (s={best}) avg {tuned['avg']:.3f}, {seconds:.1f} s, +{mem.mib:.0f} MiB")
        del merged, params, D
    return rows


def next_scale(scores: dict[float, float]) -> float | None:
    """The next s to evaluate: the first of SCALES not yet scored; then, while the best s is the largest
    (smallest) one scored, twice (half) that, within SCALE_CAP; None when the best s is interior or capped."""
    todo = [s for s in SCALES if s not in scores]
    if todo:
        return todo[0]
    best, lo, hi = max(scores, key=scores.get), min(scores), max(scores)
    if best == hi and hi * 2 <= SCALE_CAP[1]:
        return hi * 2
    if best == lo and lo / 2 >= SCALE_CAP[0]:
        return lo / 2
    return None


def save_rows(args, rows: dict) -> None:
    path = Path(args.work) / "rows.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"stamp": stamp_of(args), "rows": rows}, indent=1))
    tmp.replace(path)


def stamp_of(args) -> dict:
    return {"steps": args.steps, "examples": args.examples, "seed": args.seed, "scales": list(SCALES),
            "cap": list(SCALE_CAP), "targets": TARGETS}


def load_rows(args) -> dict:
    path = Path(args.work) / "rows.json"
    if args.fresh or not path.is_file():
        return {}
    saved, stamp = json.loads(path.read_text()), stamp_of(args)
    old = saved.get("stamp", {})
    if {k: v for k, v in old.items() if k != "cap"} != {k: v for k, v in stamp.items() if k != "cap"}:
        return {}
    # a changed cap only changes the rows whose s was capped (an interior s stops the extension)
    return {k: v for k, v in saved["rows"].items() if old.get("cap") == stamp["cap"] or v.get("scale") not in old.get("cap", ())}


ORDER = ("tsv-m", "iso-cts", "ties", "task-arithmetic")
MARGIN = 0.05


def ordering(scores: dict[str, float]) -> str:
    """The papers' chain TSV-M ≈ Iso-CTS > TIES > TA: 'holds' if both SVD methods beat TIES and TIES beats TA,
    each by ≥ MARGIN (avg score); 'does not hold' if any of those is reversed by ≥ MARGIN; else inconclusive."""
    pairs = [("tsv-m", "ties"), ("iso-cts", "ties"), ("ties", "task-arithmetic")]
    gaps = [scores[a] - scores[b] for a, b in pairs]
    if all(g >= MARGIN for g in gaps):
        return "holds"
    if any(g <= -MARGIN for g in gaps):
        return "does not hold"
    return "inconclusive"


def family_table(family: str, rows: dict) -> list[str]:
    spec, info = FAMILIES[family], rows[f"{family}/losses"]
    base, expert = info["base"][1], info["expert"][1]
    kind = f"LoRA r={spec['rank']} (PEFT folders)" if spec["method"] == "lora" else "full fine-tuning (svdkit adapter folders)"
    train = info.get("train_seconds") or {}
    lines = [f"### {family}: {kind}, lr {spec['lr']:g}", "", "| task | base loss (test) | expert loss (test) | expert run wall time (s, incl. its evaluation and export) |",
             "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {t} | {base[t]:.3f} | {expert[t]:.3f} | {train.get(t, float('nan')):.0f} |" for t in TASKS]
    head = " | ".join(TASKS)
    lines += ["", f"| method | {head} | **avg, default α** | s (val) | {head} | **avg, val-chosen s** | merge time (s) | merge memory (MiB) |",
              "|---|" + "---:|" * (2 * len(TASKS) + 5)]  # fmt: skip
    methods = {k.split("/", 1)[1]: v for k, v in rows.items() if k.startswith(family + "/") and k != f"{family}/losses"}
    import svdkit

    missing = [n for n in svdkit.methods("merge") if n not in methods and not getattr(svdkit.method_class(n), "delta_compression", False)]
    for name, r in sorted(methods.items(), key=lambda kv: -kv[1]["default"]["avg"]):
        d, t = r["default"], r["tuned"]
        lines.append(f"| {name} | " + " | ".join(f"{d[x]:.2f}" for x in TASKS) + f" | **{d['avg']:.3f}** | {scale_cell(r)} | "
                     + " | ".join(f"{t[x]:.2f}" for x in TASKS) + f" | **{t['avg']:.3f}** | {r['seconds']:.1f} | {r['memory_mib']:.0f} |")  # fmt: skip
    if missing:
        lines.append(f"\nNot run (stopped for time): {', '.join(missing)}.")
    if all(w in methods for w in ORDER):
        for proto, label in (("default", "default α"), ("tuned", "val-chosen s")):
            s = {w: methods[w][proto]["avg"] for w in ORDER}
            lines.append(f"\nPapers' ordering TSV-M ≈ Iso-CTS > TIES > task arithmetic, {family} experts, {label}: "
                         f"**{ordering(s)}** ({', '.join(f'{k} {v:.3f}' for k, v in s.items())}).")  # fmt: skip
    return lines


def scale_cell(row: dict) -> str:
    """The val-chosen s, with ' (capped)' when it is a bound of SCALE_CAP, and the grid it was chosen from."""
    grid = sorted(float(k) for k in row["val"])
    capped = " capped" if row["scale"] in SCALE_CAP else ""
    return f"{row['scale']:g}{capped} ({'/'.join(f'{g:g}' for g in grid)})"


def memory_probe(mode: str, work: Path) -> None:
    """One TSV-M merge in this process; prints JSON with the peak RSS (VmHWM), peak RssAnon and the time."""
    import svdkit
    from svdkit.core.models import default_model_dir, load_model

    experts = [str(work / f"full_{t}" / "merged") for t in TASKS]
    base = str(default_model_dir())
    reset_hwm()
    with PeakAnon() as mem:
        start = time.perf_counter()
        if mode == "stream":
            svdkit.merge_models(base, experts, svdkit.config("tsv-m"), out=work / "memory_out", overwrite=True, progress=False)
        else:
            models = [load_model(p)[0] for p in [base, *experts]]
            svdkit.merge_models(models[0], models[1:], svdkit.config("tsv-m"), progress=False)
        seconds = time.perf_counter() - start
    print(json.dumps({"mode": mode, "peak_mib": proc_status_kib("VmHWM") / 1024, "peak_anon_mib": mem.peak / 1024, "seconds": seconds}))


def memory_table(work: Path) -> list[str]:
    rows = []
    for mode in ("stream", "load"):
        cmd = [sys.executable, __file__, "--memory-probe", mode, "--work", str(work), "--threads", str(torch.get_num_threads())]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    size = sum(p.stat().st_size for p in (work / "full_plus" / "merged").glob("*.safetensors")) / 2**20
    lines = ["| TSV-M of 4 experts | peak private memory, RssAnon (MiB) | peak RSS incl. mapped files, VmHWM (MiB) | time (s) |",
             "|---|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {'streamed folder → folder' if r['mode'] == 'stream' else 'all 5 models loaded, merged in memory'} | "
              f"{r['peak_anon_mib']:.0f} | {r['peak_mib']:.0f} | {r['seconds']:.1f} |" for r in rows]  # fmt: skip
    lines.append(f"\nOne checkpoint is {size:.0f} MiB (fp32). Streaming / loading peak private memory: "
                 f"{rows[0]['peak_anon_mib'] / rows[1]['peak_anon_mib']:.2f}.")  # fmt: skip
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="fine-tuning steps per expert (batch 4 × ≤ 64 tokens)")
    p.add_argument("--examples", type=int, default=12, help="validation and test examples per task")
    p.add_argument("--seed", type=int, default=0, help="the experts' training seed (data order, LoRA init)")
    p.add_argument("--families", default="lora,full", help="comma-separated: lora, full")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every merge method)")
    p.add_argument("--work", default="/tmp/svdkit_merge_bench2", help="experts and finished rows are cached here")
    p.add_argument("--fresh", action="store_true", help="recompute every row (the experts stay cached)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared CPU is oversubscribed)")
    p.add_argument("--memory", action="store_true", help="also measure streaming vs loading peak memory")
    p.add_argument("--memory-only", action="store_true", help="only the memory table (full-FT experts already trained in --work)")
    p.add_argument("--report", action="store_true", help="only write the table from the rows finished so far in --work")
    p.add_argument("--memory-probe", choices=["stream", "load"], help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/merge.md")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args.memory_probe, work)
    if args.memory_only:
        text = "\n".join(["## Streaming memory", "", *provenance("one run per mode"), "", *memory_table(work)]) + "\n"
        print(text)
        return write_report(args.out, text)

    families = args.families.split(",")
    if args.report:
        return write(args, load_rows(args), families, None)
    from svdkit.core.models import load_model

    torch.manual_seed(0)
    sources = task_data(work)
    rows = load_rows(args)
    base, tok = load_model("default")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    sets = eval_sets(tok, sources, args.examples, args.seed)
    for family in families:
        if family not in FAMILIES:
            raise SystemExit(f"unknown family {family!r}; use {', '.join(FAMILIES)}.")
        run_family(family, work, sources, args, rows, base, tok, sets, pad_id)
    write(args, rows, families, memory_table(work) if args.memory else None)


def write(args, rows, families, memory) -> None:
    lines = ["# Merging four task experts of SmolLM2-135M-Instruct", "", *provenance(
        f"single run, expert seed {args.seed}: {args.steps} fine-tuning steps per expert (batch 4, ≤ {MAX_LENGTH} tokens), "
        f"q/v projections, {args.examples} validation + {args.examples} test examples per task"), "",
        "Score = fraction of the task expert's held-out loss improvement the merge keeps, (L_base − L_merged)/(L_base − L_expert), "
        f"on the test half; s = the scale of the merged task vector chosen on the validation half from {{{', '.join(f'{s:g}' for s in SCALES)}}}, "
        f"extended by doubling (halving) while the best s is the grid's largest (smallest), within [{SCALE_CAP[0]:g}, {SCALE_CAP[1]:g}]; "
        "the s column lists the grid each method was scored on. "
        f"Ordering verdict rule: 'holds' if TSV-M and Iso-CTS each beat TIES and TIES beats task arithmetic by ≥ {MARGIN} "
        f"in avg score, 'does not hold' if one of these is reversed by ≥ {MARGIN}, else 'inconclusive'.", ""]  # fmt: skip
    for family in families:
        if f"{family}/losses" in rows:
            lines += [*family_table(family, rows), ""]
    if memory:
        lines += ["## Streaming memory", "", *memory]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
