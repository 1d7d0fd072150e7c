"""`svdkit.spectrum` side by side with WeightWatcher's `analyze()` on the default model (SmolLM2-135M).

Both run in this one process on the same fp32 model, alternating (svdkit, WW, svdkit, WW, …), with the
same thread count for torch and for numpy/scipy's BLAS (threadpoolctl). Reported per tool: the median
wall time of the analysis (model already loaded) and the median CPU time of the process over the same
interval (`time.process_time`: on a shared machine the wall time also counts the time other jobs hold the
cores, the CPU time does not; with 1 thread the two agree on a quiet machine), the peak resident memory
above the pre-run baseline (VmHWM reset before each run; every weight is touched once before, so the model's own pages are in the
baseline), the number of matrices analysed; and the agreement of the power-law α
per matrix (joined by module name): the median |α_svdkit − α_WW|, the share within WeightWatcher's own
fit tolerance σ_α = (α − 1)/√n, and the matrices that differ most with both fits' x_min and KS distance.

WeightWatcher is a benchmark-only peer (`pip install weightwatcher==0.7.7`; it pulls pandas, scipy,
scikit-learn, powerlaw and does not change torch); without it the script reports svdkit alone.

Run:  .venv/bin/python benchmarks/inspect_speed.py [--repeats 1] [--threads 1] [--out benchmarks/results/inspect.md]
"""

from __future__ import annotations

import os
import sys

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from common import log, malloc_trim, proc_status_kib, provenance, reset_hwm, write_report  # noqa: E402
from svdkit.core.models import load_model  # noqa: E402
from svdkit.inspection.spectrum import spectrum  # noqa: E402


def _measure(fn):
    """(result, wall seconds, CPU seconds of this process, peak MiB above the baseline RSS)."""
    malloc_trim()
    reset_hwm()
    base = proc_status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return out, seconds, cpu, (proc_status_kib("VmHWM") - base) / 1024


def run_svdkit(model):
    return {r["name"]: r for r in spectrum(model, progress=False)}


def run_ww(model):
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        details = ww.WeightWatcher(model=model).analyze(plot=False)
    return {str(r["longname"]): r for r in details.to_dict("records")}


def agreement(ours: dict, theirs: dict) -> tuple[list[dict], dict]:
    joined = []
    for name, r in ours.items():
        w = theirs.get(name)
        if w is None or not (w["alpha"] > 0):
            continue
        joined.append({"name": name, "alpha_svdkit": r["alpha"], "alpha_ww": float(w["alpha"]), "diff": abs(r["alpha"] - float(w["alpha"])),
                       "sigma_ww": float(w["sigma"]), "xmin_svdkit": r["alpha_xmin"], "xmin_ww": float(w["xmin"]),
                       "D_svdkit": r["alpha_D"], "D_ww": float(w["D"])})  # fmt: skip
    diffs = [j["diff"] for j in joined]
    stats = {"joined": len(joined), "median_abs_diff": statistics.median(diffs) if diffs else float("nan"),
             "max_abs_diff": max(diffs) if diffs else float("nan"),
             "within_ww_sigma": sum(j["diff"] <= j["sigma_ww"] + 1e-9 for j in joined),
             "within_1e-6": sum(j["diff"] <= 1e-6 for j in joined)}  # fmt: skip
    return sorted(joined, key=lambda j: -j["diff"]), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads for both tools (default 1)")
    ap.add_argument("--out", default="benchmarks/results/inspect.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import threadpoolctl
        import weightwatcher  # noqa: F401

        limits = threadpoolctl.threadpool_limits(args.threads)
    except ImportError as exc:
        log(f"WeightWatcher missing ({exc}): pip install weightwatcher==0.7.7 — reporting svdkit alone")
        limits = None
    model, _ = load_model("default")
    model.eval()
    with torch.no_grad():  # fault every weight page in now, so that the peaks below are the tools' own memory
        touched = sum(float(p.double().sum()) for p in model.parameters())
    log(f"weights resident (checksum {touched:.6g})")
    tools = {"svdkit.spectrum": run_svdkit} | ({"WeightWatcher 0.7.7 analyze()": run_ww} if limits is not None else {})
    times, cpus, peaks, results = {t: [] for t in tools}, {t: [] for t in tools}, {t: [] for t in tools}, {}
    for rep in range(args.repeats):
        for tool, fn in tools.items():
            log(f"run {rep + 1}/{args.repeats}: {tool} …")
            results[tool], sec, cpu, peak = _measure(lambda: fn(model))
            times[tool].append(sec)
            cpus[tool].append(cpu)
            peaks[tool].append(peak)
            log(f"  {sec:.1f} s wall, {cpu:.1f} s CPU, peak +{peak:.0f} MiB, {len(results[tool])} matrices")
    lines = ["# svdkit inspect vs WeightWatcher (default model, SmolLM2-135M-Instruct, fp32)", "",
             *provenance(f"{args.repeats} run(s) per tool, alternating, BLAS threads {args.threads}"), "",
             "| tool | matrices | wall time (s): median (runs) | wall ratio | CPU time (s): median (runs) | CPU ratio | peak RSS above baseline (MiB) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    ref, ref_cpu = statistics.median(times["svdkit.spectrum"]), statistics.median(cpus["svdkit.spectrum"])
    for tool in tools:
        med, cpu = statistics.median(times[tool]), statistics.median(cpus[tool])
        runs = ", ".join(f"{t:.1f}" for t in times[tool])
        cruns = ", ".join(f"{t:.1f}" for t in cpus[tool])
        lines.append(f"| {tool} | {len(results[tool])} | {med:.1f} ({runs}) | {med / ref:.1f}× | {cpu:.1f} ({cruns}) | {cpu / ref_cpu:.1f}× | "
                     f"{max(peaks[tool]):.0f} |")  # fmt: skip
    if limits is not None:
        joined, st = agreement(results["svdkit.spectrum"], results["WeightWatcher 0.7.7 analyze()"])
        lines += ["", f"α agreement over {st['joined']} matrices matched by name: median |Δα| = {st['median_abs_diff']:.2e}, "
                  f"max {st['max_abs_diff']:.3g}; identical to 1e-6: {st['within_1e-6']}; within WeightWatcher's σ_α: "
                  f"{st['within_ww_sigma']}.", "", "Largest differences:", "",
                  "| matrix | α svdkit | α WW | σ_α WW | x_min svdkit | x_min WW | D svdkit | D WW |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for j in joined[:8]:
            lines.append(f"| {j['name']} | {j['alpha_svdkit']:.4g} | {j['alpha_ww']:.4g} | {j['sigma_ww']:.3g} | {j['xmin_svdkit']:.4g} | "
                         f"{j['xmin_ww']:.4g} | {j['D_svdkit']:.4g} | {j['D_ww']:.4g} |")  # fmt: skip
        missing = sorted(set(results["svdkit.spectrum"]) - set(results["WeightWatcher 0.7.7 analyze()"]))
        lines += ["", f"Matrices svdkit analysed that WeightWatcher did not report: {missing or 'none'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
