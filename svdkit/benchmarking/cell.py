"""One bench process: the cells of one method (its LR sweep, seeds, claim variants), trained and evaluated
with svdkit's own pieces (api.adapt, train.make_optimizer/train_step, data.eval_loss).

Run by grid.py as ``python -m svdkit.benchmarking.cell SPEC.json`` so that each method starts from a fresh process
(peak memory is per process; a crash costs one method). A cell whose ``result.json`` exists is skipped, so
a killed bench resumes where it stopped. Within a process the base model is loaded once (every cell ends
with ``unadapt``, which restores it bit-exactly), calibration statistics are computed once, and an LR sweep
starts every cell from the first cell's saved init (``load_adapter``: no SVD recomputed).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from svdkit.adapters import api
from svdkit.training import data
from svdkit.core.registry import config
from svdkit.core.files import write_text
from svdkit.core.models import load_model
from svdkit.training.loop import make_optimizer, train_step
from svdkit.benchmarking import arithmetic, bigbench
from svdkit.adapters.saving import load_adapter, save_adapter
from svdkit.benchmarking.diagnose import intruder_summary, malloc_trim, peak_kib, reset_peak, rss_kib

RESULT = "result.json"
EVAL_BATCH = 64  # evaluation batches (held-out loss, generation): short problems, so one forward serves them all


def inputs(bench: dict, out: Path, tok) -> dict:
    """Train/held-out examples, accuracy questions and Lee blocks: the same for every cell of the bench."""
    problems = arithmetic.generate(bench["train_problems"] + bench["heldout_problems"], seed=bench["data_seed"])
    heldout, train = problems[: bench["heldout_problems"]], problems[bench["heldout_problems"] :]
    lee = data.DATASETS["lee"](tok, 128)[0][: bench["lee_blocks"]] if bench["lee_blocks"] else []
    return {"train": arithmetic.examples(tok, train), "heldout": arithmetic.examples(tok, heldout),
            "questions": json.loads((out / "questions.json").read_text()), "lee": lee}  # fmt: skip


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _evaluate(model, tok, inp, bench, measure) -> dict:
    res = {"accuracy": bigbench.accuracy(model, tok, inp["questions"], batch_size=EVAL_BATCH, max_new_tokens=bench["max_new_tokens"])}
    if "lee" in measure and inp["lee"]:
        res["lee_perplexity"] = data.eval_loss(model, inp["lee"], EVAL_BATCH // 4, _pad_id(tok))[1]
    return res


def run_base(bench: dict, out: Path, cell: dict) -> dict:
    """The untrained model: held-out loss at step 0, zero-shot accuracy (the floor), Lee perplexity."""
    model, tok = load_model(bench["model"])
    inp = inputs(bench, out, tok)
    loss = data.eval_loss(model, inp["heldout"], EVAL_BATCH, _pad_id(tok))[0]
    return {"heldout_loss": loss, **_evaluate(model, tok, inp, bench, ("lee",))}


def _calibration(bench, method_cfg, model, inp, tok, cache: dict):
    """The method's statistics on the first ``calibration_samples`` training examples, computed once per
    process for each distinct statistic (an LR sweep reuses them; the base weights are the same)."""
    if not method_cfg.uses_calibration:
        return None
    key = repr(method_cfg.statistic())
    stats = cache.setdefault("stats", {})
    if key not in stats:
        from svdkit.core.calibration import calibrate  # svdkit.calibrate: the data-aware methods' statistics

        items, bs = inp["train"][: bench["calibration_samples"]], bench["batch_size"]
        batches = [data.collate(items[i : i + bs], _pad_id(tok)) for i in range(0, len(items), bs)]
        start = time.perf_counter()
        stats[key] = calibrate(model, batches, method_cfg, progress=False)
        cache["seconds"] = time.perf_counter() - start
    return stats[key]


def _train(bench, cell, model, inp, pad, method_cfg) -> dict:
    steps, lr = bench["steps"], cell["lr"]
    loop = make_optimizer(model, lr, method_cfg.weight_decay, steps, max(1, round(0.1 * steps)))
    curve, times, losses = [], [], []
    model.train()
    while loop.step < steps:
        batch = data.collate(data.batch_at(inp["train"], loop.step, bench["batch_size"], cell["seed"]), pad)
        start = time.perf_counter()
        row = train_step(model, model, [batch], loop, max_grad_norm=1.0, peak_lr=lr, total=steps)
        times.append(time.perf_counter() - start)
        losses.append(row["loss"])
        if not math.isfinite(row["loss"]):
            curve.append((loop.step, math.inf))
            break
        if loop.step % bench["eval_every"] == 0 or loop.step == steps:
            curve.append((loop.step, data.eval_loss(model, inp["heldout"], EVAL_BATCH, pad)[0]))
    return {"curve": curve, "step_s_median": statistics.median(times), "train_loss_last": losses[-1]}


def _model(bench: dict, cache: dict):
    """The base model, loaded and paged in once per process (each cell ends with ``unadapt``, which restores
    the original weights bit-exactly)."""
    if "model" not in cache:
        model, tok = load_model(bench["model"])
        with torch.no_grad():  # page the memory-mapped weights in before measuring
            for p in model.parameters():
                p.sum()
        cache["model"] = (model, tok)
    return cache["model"]


def _adapt(model, method_cfg, stats, cache: dict, out: Path) -> tuple[float, float]:
    """Adapt ``model``; returns (init seconds, init peak MiB above the base). The LR sweep of one method
    starts from the same init: the first cell saves it (svdkit.save_adapter) and the others load it (no SVD
    or calibration recomputed), reporting the first cell's init time and transient peak."""
    key = json.dumps(method_cfg.to_dict(), sort_keys=True)
    inits = cache.setdefault("inits", {})
    if key in inits:
        folder, init_s, init_peak = inits[key]
        load_adapter(model, folder)
        return init_s, init_peak
    base_rss = rss_kib()
    reset_peak()
    start = time.perf_counter()
    api.adapt(model, method_cfg, **({"calibration": stats} if stats is not None else {}), progress=False)
    init_s, init_peak = time.perf_counter() - start, (peak_kib() - base_rss) / 1024
    folder = out / "inits" / f"{method_cfg.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    save_adapter(model, folder, overwrite=True)
    inits[key] = (folder, init_s, init_peak)
    return init_s, init_peak


def run_cell(bench: dict, out: Path, cell: dict, cache: dict) -> dict:
    """Adapt, train and evaluate one (method, options, lr, seed) cell; returns its result row.

    peak_mib: the larger of the init's transient peak and the training peak, above the base model's RSS."""
    torch.manual_seed(cell["seed"])
    model, tok = _model(bench, cache)
    if "inputs" not in cache:
        cache["inputs"] = inputs(bench, out, tok)
    inp, pad = cache["inputs"], _pad_id(tok)
    method_cfg = config(cell["method"], seed=cell["seed"], **cell["options"])
    stats = _calibration(bench, method_cfg, model, inp, tok, cache)
    gc.collect()
    malloc_trim()
    base_rss = rss_kib()
    try:
        init_s, init_peak = _adapt(model, method_cfg, stats, cache, out)
        reset_peak()
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trained = _train(bench, cell, model, inp, pad, method_cfg)
        peak = max(init_peak, (peak_kib() - base_rss) / 1024)
        model.eval()
        res = {"params": params, "init_s": init_s, "peak_mib": peak, **trained,
               **_evaluate(model, tok, inp, bench, cell["measure"])}  # fmt: skip
        if "intruders" in cell["measure"]:
            res["intruders"] = intruder_summary(model, bench["intruder_layers"])
    finally:
        if getattr(model, "_svdkit", None) is not None:
            api.unadapt(model)
    if "seconds" in cache:
        res["calibration_s"] = cache["seconds"]
    finite = [loss for _, loss in res["curve"] if math.isfinite(loss)]
    res["best_heldout"] = min(finite) if finite else math.inf
    return res


def run_spec(spec: dict, on_done=lambda cell_id: None) -> None:
    """Run the pending cells of ``spec`` ({"bench", "out", "cells"}) in this process, in order."""
    bench, out, cache = spec["bench"], Path(spec["out"]), {}
    for cell in spec["cells"]:
        folder = out / "cells" / cell["id"]
        if not (folder / RESULT).is_file():
            start = time.perf_counter()
            try:
                res = run_base(bench, out, cell) if cell["method"] == "base" else run_cell(bench, out, cell, cache)
            except (ValueError, TypeError, ImportError, NotImplementedError, KeyError, RuntimeError) as exc:
                res = {"skipped": f"{type(exc).__name__}: {exc}"}
            res.update(cell=cell, wall_s=time.perf_counter() - start)
            folder.mkdir(parents=True, exist_ok=True)
            write_text(folder / RESULT, json.dumps(res, indent=1, default=float) + "\n")
        on_done(cell["id"])


def main(spec_path: str) -> int:
    run_spec(json.loads(Path(spec_path).read_text()), lambda cell_id: print(f"done {cell_id}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
