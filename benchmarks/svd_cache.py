"""The opt-in SVD cache (svdkit.core.svd_cache): time of svdkit.adapt without a cache, with an empty
cache (cold: decompose + hash + write) and with a filled one (warm: hash + read), side by side.

On the default model (SmolLM2-135M-Instruct, fp32, 210 block linears; lm_head not adapted), rank 16, for
PiSSA with ``svd="exact"`` and ``svd="randomized"`` (niter 4) and for SVFT (full exact SVD of every
weight). Each repeat runs the three variants round-robin, each on a fresh ``copy.deepcopy`` of the
pristine model (not timed), with the cache folder emptied before each cold run; reported: median and min
over repeats, the warm run's speed-up over no cache, the cache's size on disk, and whether the warm
adapter equals the uncached one bit for bit.

Run:  .venv/bin/python benchmarks/svd_cache.py [--repeats 3] [--rank 16] [--targets all-linear]
          [--methods pissa-exact pissa-randomized svft] [--out benchmarks/results/svd_cache.md]
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import copy  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("benchmarks_common", os.path.join(HERE, "common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)
log, provenance, write_report = common.log, common.provenance, common.write_report

import svdkit  # noqa: E402
from svdkit.adapters.api import adapted_layers  # noqa: E402


def snapshot(model) -> list[torch.Tensor]:
    return [t.detach().clone() for _, layer in adapted_layers(model) for _, t in sorted(layer.state_dict().items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/svd_cache.md")
    ap.add_argument("--targets", default="all-linear", help="the adapters' targets (a preset or a regex)")
    ap.add_argument("--methods", nargs="+", default=["pissa-exact", "pissa-randomized", "svft"],
                    choices=["pissa-exact", "pissa-randomized", "svft"])
    args = ap.parse_args()
    pristine, _ = svdkit.load_model()
    every = {
        "pissa-exact": ("PiSSA exact", svdkit.PiSSA(rank=args.rank, targets=args.targets)),
        "pissa-randomized": ("PiSSA randomized niter=4", svdkit.PiSSA(rank=args.rank, svd="randomized", niter=4,
                                                                     targets=args.targets)),
        "svft": ("SVFT (full SVD)", svdkit.SVFT(targets=args.targets)),
    }
    configs = dict(every[m] for m in args.methods)
    rows = []
    for label, cfg in configs.items():
        times = {"no cache": [], "cold cache": [], "warm cache": []}
        folder = Path(tempfile.mkdtemp(prefix="svdkit-svd-cache-"))
        same, size = None, 0
        try:
            for rep in range(args.repeats):
                shutil.rmtree(folder, ignore_errors=True)
                for variant in times:
                    model = copy.deepcopy(pristine)
                    start = time.perf_counter()
                    if variant == "no cache":
                        svdkit.adapt(model, cfg)
                    else:
                        with svdkit.use_svd_cache(folder, max_bytes="8G"):
                            svdkit.adapt(model, cfg)
                    times[variant].append(time.perf_counter() - start)
                    if rep == 0 and variant == "no cache":
                        reference = snapshot(model)
                    if rep == 0 and variant == "warm cache":
                        same = all(torch.equal(a, b) for a, b in zip(reference, snapshot(model)))
                        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
                    log(f"{label} / {variant} / repeat {rep}: {times[variant][-1]:.2f} s")
                    del model
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(f"| {label} | " + " | ".join(f"{med[k]:.2f} ({min(v):.2f})" for k, v in times.items())
                    + f" | {med['no cache'] / med['warm cache']:.1f}× | {size / 2**20:.0f} MiB | {'yes' if same else 'NO'} |")
    lines = ["# SVD cache: svdkit.adapt time without, with an empty and with a filled cache", "",
             *provenance(f"rank {args.rank}, {args.repeats} repeats, default model fp32, targets {args.targets!r}"), "",
             "| method | no cache, s median (min) | cold cache | warm cache | warm speed-up | cache size | warm == uncached |",
             "|---|---|---|---|---|---|---|", *rows, ""]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    write_report(args.out, text)


if __name__ == "__main__":
    main()
