"""One bench process: the cells of one method (its LR sweep, seeds, claim variants), trained and evaluated
with svdkit's own pieces (api.adapt, train.make_optimizer/train_step, batches.eval_loss).

Run by grid.py as ``python -m svdkit.benchmarking.cell SPEC.json`` so that each method starts from a fresh process
(peak memory is per process; a crash costs one method). A cell whose ``result.json`` exists is skipped, so
a killed bench resumes where it stopped. Only a method's refusal of its configuration
(:class:`svdkit.core.registry.Refused`) is written as a ``result.json`` "skipped"; any other exception goes to
the cell's ``error.json`` (type, message, traceback) and the cell runs again on resume.

Splits (disjoint, from one seeded generator): validation (``heldout_problems``: chooses the LR and the
checkpoint), test (``test_problems``: what the report shows), calibration (``calibration_samples``: the
data-aware methods' statistics, held apart from training so the step budget stays the same for every
method) and training (``train_problems``). Accuracy is measured on the BIG-bench (or generated) questions
at the chosen checkpoint. Within a process the base model is loaded once (every cell ends
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
import traceback
from pathlib import Path

import torch

from svdkit.adapters import api
from svdkit.training import data
from svdkit.training.batches import batch_at, collate, eval_loss
from svdkit.core.registry import Refused, config
from svdkit.core.files import write_text
from svdkit.core.models import load_model
from svdkit.training.loop import data_splits, make_optimizer, split_schedule, train_step
from svdkit.benchmarking import arithmetic, bigbench
from svdkit.adapters.saving import load_adapter, save_adapter
from svdkit.benchmarking.diagnose import intruder_summary, malloc_trim, peak_kib, reset_peak, rss_kib

RESULT = "result.json"
ERROR = "error.json"
EVAL_BATCH = 64  # evaluation batches (held-out loss, generation): short problems, so one forward serves them all


SPLITS = ("val", "test", "calibration", "train")


def split_sizes(bench: dict) -> dict[str, int]:
    return {"val": bench["heldout_problems"], "test": bench["test_problems"],
            "calibration": bench["calibration_samples"], "train": bench["train_problems"]}  # fmt: skip


def inputs(bench: dict, out: Path, tok) -> dict:
    """Validation/test/calibration/train examples (disjoint), accuracy questions and Lee blocks: the same for
    every cell of the bench."""
    sizes = split_sizes(bench)
    problems = arithmetic.generate(sum(sizes.values()), seed=bench["data_seed"])
    out_, start = {}, 0
    for name in SPLITS:
        out_[name] = arithmetic.examples(tok, problems[start : start + sizes[name]])
        start += sizes[name]
    lee = data.DATASETS["lee"](tok, 128)[0][: bench["lee_blocks"]] if bench["lee_blocks"] else []
    return {**out_, "questions": json.loads((out / "questions.json").read_text()), "lee": lee}


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _evaluate(model, tok, inp, bench, measure) -> dict:
    res = {"accuracy": bigbench.accuracy(model, tok, inp["questions"], batch_size=EVAL_BATCH, max_new_tokens=bench["max_new_tokens"])}
    if "lee" in measure and inp["lee"]:
        res["lee_perplexity"] = eval_loss(model, inp["lee"], EVAL_BATCH // 4, _pad_id(tok))[1]
    return res


def run_base(bench: dict, out: Path, cell: dict) -> dict:
    """The untrained model: validation and test loss, zero-shot accuracy (the floor), Lee perplexity."""
    model, tok = load_model(bench["model"])
    inp, pad = inputs(bench, out, tok), _pad_id(tok)
    val, test = (eval_loss(model, inp[k], EVAL_BATCH, pad)[0] for k in ("val", "test"))
    return {"val_loss": val, "test_loss": test, **_evaluate(model, tok, inp, bench, ("lee",))}


def _calibration(bench, method_cfg, model, inp, tok, cache: dict):
    """The method's statistics on the held-apart calibration split (never trained on), computed once per
    process for each distinct statistic (an LR sweep reuses them; the base weights are the same)."""
    if not method_cfg.uses_calibration:
        return None
    key = repr(method_cfg.statistic())
    stats = cache.setdefault("stats", {})
    if key not in stats:
        from svdkit.core.calibration import calibrate  # svdkit.calibrate: the data-aware methods' statistics

        items, bs = inp["calibration"], bench["batch_size"]
        batches = [collate(items[i : i + bs], _pad_id(tok)) for i in range(0, len(items), bs)]
        start = time.perf_counter()
        stats[key] = calibrate(model, batches, method_cfg, progress=False)
        cache["seconds"] = time.perf_counter() - start
    return stats[key]


def _train(bench, cell, model, inp, pad, method_cfg) -> dict:
    """Train ``steps`` steps, evaluating the validation loss every ``eval_every`` steps and at the end; the
    trainable tensors at the best validation checkpoint are restored before returning (checkpoint selection
    on the validation split). ``snapshot_mib``: the size of that copy (left out of the reported peak).
    Two-split methods (BiLoRA) alternate batches of their two shares of the training split, as finetune does."""
    steps, lr = bench["steps"], cell["lr"]
    loop = make_optimizer(model, lr, method_cfg.weight_decay, steps, max(1, round(0.1 * steps)))
    curve, times, losses, best = [], [], [], (math.inf, 0, None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    snapshot_mib = sum(p.numel() * p.element_size() for p in trainable) / 2**20
    splits, schedule = data_splits(model, inp["train"], cell["seed"]), split_schedule(model)
    model.train()
    while loop.step < steps:
        split, index = next(schedule)
        batch = collate(batch_at(splits[split], index, bench["batch_size"], cell["seed"]), pad)
        start = time.perf_counter()
        row = train_step(model, model, [batch], loop, max_grad_norm=1.0, peak_lr=lr, total=steps, split=split)
        times.append(time.perf_counter() - start)
        losses.append(row["loss"])
        if not math.isfinite(row["loss"]):
            curve.append((loop.step, math.inf))
            break
        if loop.step % bench["eval_every"] == 0 or loop.step == steps:
            val = eval_loss(model, inp["val"], EVAL_BATCH, pad)[0]
            curve.append((loop.step, val))
            if val < best[0]:
                best = (val, loop.step, [p.detach().clone() for p in trainable])
    if best[2] is not None:
        with torch.no_grad():
            for p, saved in zip(trainable, best[2]):
                p.copy_(saved)
    return {"curve": curve, "val_loss": best[0], "best_step": best[1], "snapshot_mib": snapshot_mib,
            "step_s_median": statistics.median(times), "train_loss_last": losses[-1]}  # fmt: skip


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
    folder = out / "inits" / f"{method_cfg.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    timing = folder.parent / f"{folder.name}.json"
    if key not in inits and folder.is_dir() and timing.is_file():  # saved by an earlier process (LR extension)
        inits[key] = (folder, *json.loads(timing.read_text()))
    if key in inits:
        folder, init_s, init_peak = inits[key]
        load_adapter(model, folder)
        return init_s, init_peak
    base_rss = rss_kib()
    reset_peak()
    start = time.perf_counter()
    api.adapt(model, method_cfg, **({"calibration": stats} if stats is not None else {}), progress=False)
    init_s, init_peak = time.perf_counter() - start, (peak_kib() - base_rss) / 1024
    save_adapter(model, folder, overwrite=True)
    write_text(timing, json.dumps([init_s, init_peak]) + "\n")
    inits[key] = (folder, init_s, init_peak)
    return init_s, init_peak


def run_cell(bench: dict, out: Path, cell: dict, cache: dict) -> dict:
    """Adapt, train and evaluate one (method, options, lr, seed) cell; returns its result row.

    peak_mib: the larger of the init's transient peak and the training peak, above the base model's RSS, less
    the best-checkpoint copy the bench keeps (not part of the method's footprint)."""
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
        peak = max(init_peak, (peak_kib() - base_rss) / 1024 - trained.pop("snapshot_mib"))
        model.eval()
        res = {"params": params, "init_s": init_s, "peak_mib": peak, **trained,
               "test_loss": eval_loss(model, inp["test"], EVAL_BATCH, pad)[0],
               **_evaluate(model, tok, inp, bench, cell["measure"])}  # fmt: skip
        if "intruders" in cell["measure"]:
            res["intruders"] = intruder_summary(model, bench["intruder_layers"])
    finally:
        if getattr(model, "_svdkit", None) is not None:
            api.unadapt(model)
    if "seconds" in cache:
        res.update(calibration_s=cache["seconds"], calibration_examples=len(inp["calibration"]))
    return res


def run_spec(spec: dict, on_done=lambda cell_id: None) -> None:
    """Run the pending cells of ``spec`` ({"bench", "out", "cells"}) in this process, in order."""
    bench, out, cache = spec["bench"], Path(spec["out"]), {}
    for cell in spec["cells"]:
        folder = out / "cells" / cell["id"]
        if not (folder / RESULT).is_file():
            start = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            try:
                res = run_base(bench, out, cell) if cell["method"] == "base" else run_cell(bench, out, cell, cache)
            except Refused as exc:  # the method's own statement about this configuration: a result
                res = {"skipped": f"{type(exc).__name__}: {exc}"}
            except Exception as exc:  # a failure (a bug, out of memory, …): recorded apart, retried on resume
                error = {"cell": cell, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                write_text(folder / ERROR, json.dumps(error, indent=1) + "\n")
                on_done(cell["id"])
                continue
            res.update(cell=cell, wall_s=time.perf_counter() - start)
            write_text(folder / RESULT, json.dumps(res, indent=1, default=float) + "\n")
            (folder / ERROR).unlink(missing_ok=True)  # an earlier failure of this cell, now retried
        on_done(cell["id"])


def main(spec_path: str) -> int:
    run_spec(json.loads(Path(spec_path).read_text()), lambda cell_id: print(f"done {cell_id}", flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
