"""Accuracy of the randomized bottom-r SVD (MiLoRA, SoMA, KaSA, Effort, CorDA-KPA) on the default model.

For every block linear (q, k, v, o, gate, up, down; 210 matrices, or those of ``--blocks``) of
SmolLM2-135M-Instruct (fp32 weights, decomposed in fp64) this computes the bottom-r triplets three ways, one
after the other on the same matrices:

  1. exact                       svd_exact(W, r, "bottom") (LAPACK, the reference)
  2. randomized, fixed niter=4   svd_bottom_randomized(..., niter=4, tol=None)  (svdkit before the fix)
  3. randomized, converged       svd_bottom_randomized(..., niter=4)            (default: convergence test)

and a synthetic bulk spectrum (a 1536×576 standard Gaussian, the shape of gate/up_proj) as the hard case.

Reported per variant: the bottom-r residual ratio sqrt(Σ‖W Ṽ_rᵀ‖²_F / Σ‖W V_r*ᵀ‖²_F) over the layers, where
Ṽ_r are the variant's bottom right singular vectors and V_r* the exact ones (the energy W leaves in the
subspace; the exact bottom subspace holds the least, so 1 = optimal and > 1 means a worse subspace: the
bottom-r analogue of the top-r residual ratio of init_speed.py); the worst layer's ratio; the smallest
principal-angle cosine to the exact subspace over all layers; the largest relative singular-value error;
and the wall time of the whole pass (one run each, on a shared noisy machine: read it as an indication).

Run:  .venv/bin/python benchmarks/bottom_svd.py [--rank 16] [--blocks 0,10,20,29] [--out benchmarks/results/bottom_svd.md]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import log, provenance, write_report
from svdkit.core.linalg import layer_seed, svd_bottom_randomized, svd_exact
from svdkit.core.models import load_model
from svdkit.core.targets import select_targets

VARIANTS = {
    "randomized niter=4 (fixed)": lambda W, r, s: svd_bottom_randomized(W, r, [s], niter=4, tol=None),
    "randomized niter≥4 (converged)": lambda W, r, s: svd_bottom_randomized(W, r, [s], niter=4),
}


def _timed(weights: dict[str, torch.Tensor], fn) -> tuple[dict, float]:
    start, found = time.perf_counter(), {}
    for name, W in weights.items():
        found[name] = fn(W)
    return found, time.perf_counter() - start


def measure(weights: dict[str, torch.Tensor], rank: int) -> list[dict]:
    exact, exact_s = _timed(weights, lambda W: svd_exact(W, rank, "bottom", torch.float64))
    rows = []
    for variant, fn in {"exact (the reference)": None, **VARIANTS}.items():
        if fn is None:
            found, seconds = exact, exact_s
        else:
            found, seconds = {}, 0.0
            for name, W in weights.items():  # per layer, its own seed
                part, s = _timed({name: W}, lambda W, name=name: fn(W, rank, layer_seed(0, name)))
                found.update(part)
                seconds += s
        num = den = 0.0
        worst, cos_min, sv_err = 1.0, 1.0, 0.0
        for name, W in weights.items():
            W64 = W.double()
            U0, S0, Vh0 = exact[name]
            _, S, Vh = found[name]
            e, e0 = float(torch.linalg.matrix_norm(W64 @ Vh.double().T)), float(S0.double().norm())
            num, den = num + e * e, den + e0 * e0
            worst = max(worst, e / e0)
            cos_min = min(cos_min, float(torch.linalg.svdvals(Vh0.double() @ Vh.double().T).min()))
            sv_err = max(sv_err, float(((S.double() - S0.double()).abs() / S0.double()).max()))
        rows.append({"variant": variant, "ratio": (num / den) ** 0.5, "worst": worst, "cos": cos_min,
                     "sv_err": sv_err, "seconds": seconds})  # fmt: skip
        log(f"{variant}: {rows[-1]}")
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| variant | bottom-r residual ratio (aggregate) | worst layer ratio | min principal-angle cos | "
           "max rel. σ error | time, one pass (s) |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['variant']} | {r['ratio']:.6f} | {r['worst']:.6f} | {r['cos']:.4f} | {r['sv_err']:.2e} | "
                   f"{r['seconds']:.1f} |")  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--blocks", default=None, help="comma-separated block indices (default: all 30 blocks)")
    p.add_argument("--out", default="benchmarks/results/bottom_svd.md")
    args = p.parse_args()
    model, _ = load_model("default")
    weights = {n: m.weight.detach() for n, m in select_targets(model, "all-linear", None)}
    if args.blocks:
        keep = {f"layers.{b}." for b in args.blocks.split(",")}
        weights = {n: W for n, W in weights.items() if any(k in n for k in keep)}
    log(f"{len(weights)} block linears, bottom-{args.rank}")
    model_rows = measure(weights, args.rank)
    gauss = {"gaussian": torch.randn(1536, 576, generator=torch.Generator().manual_seed(0))}
    gauss_rows = measure(gauss, args.rank)
    lines = ["# Randomized bottom-r SVD accuracy (`benchmarks/bottom_svd.py`)", "", *provenance(f"rank {args.rank}"), "",
             f"## Default model: {len(weights)} block linears{f' (blocks {args.blocks})' if args.blocks else ''} "
             "(fp32 weights, fp64 decomposition)", "",
             *table(model_rows), "", "## 1536×576 standard Gaussian (a bulk spectrum)", "", *table(gauss_rows), ""]  # fmt: skip
    write_report(args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
