"""`svdkit export RUN_DIR`: ship a finished run as a PEFT LoRA adapter or as plain merged weights (DESIGN.md §4).

A run folder (written by :func:`svdkit.training.finetune.finetune`) holds ``config.json`` (the run's
:class:`FinetuneConfig`, which names the base model) and ``adapter/`` (the svdkit adapter). Export reloads
the base model, loads the adapter onto it (checking its fingerprint), and writes:
- ``peft``: a PEFT LoRA folder (exact for low-rank updates; with ``rank`` a truncated LoRA whose per-layer
  error is in ``truncation.json`` — the only PEFT form of a full-rank update such as SVFT's);
- ``merged``: a Hugging Face folder (weights + config + tokenizer) with the update folded in, which
  ``AutoModelForCausalLM.from_pretrained`` loads without svdkit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FORMATS = ("peft", "merged")


def _run_config(run: Path):
    from svdkit.training.finetune import CONFIG, FinetuneConfig

    if not (run / CONFIG).is_file() or not (run / "adapter" / "svdkit.json").is_file():
        raise FileNotFoundError(
            f"{run} is not a finished svdkit finetune run: it needs {CONFIG} and adapter/svdkit.json "
            "(written at the end of `svdkit finetune --out DIR`)."
        )
    return FinetuneConfig.from_file(run / CONFIG)


def export_run(run_dir: str | os.PathLike, format: str, out: str | os.PathLike, *, rank: int | None = None,
               overwrite: bool = False) -> dict:
    """Export the run in ``run_dir`` to ``out`` as ``format`` (``"peft"`` or ``"merged"``); returns a summary
    {"format", "out", "method", "truncation" (peft with rank: the truncation.json contents, else None)}."""
    from svdkit.adapters.api import merge, state
    from svdkit.adapters.export import TRUNCATION, export_peft
    from svdkit.adapters.saving import load_adapter
    from svdkit.core.files import atomic_dir
    from svdkit.core.models import load_model

    if format not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {format!r}.")
    if format == "merged" and rank is not None:
        raise ValueError("rank truncates a PEFT export; the merged export is exact and takes no rank.")
    run, out = Path(run_dir), Path(out)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise ValueError(f"--out {out} is inside the run folder {run}; export to a folder of its own.")
    cfg = _run_config(run)
    model, tokenizer = load_model(cfg.model)
    load_adapter(model, run / "adapter")
    method = state(model).config.name
    if format == "peft":
        export_peft(model, out, rank=rank, overwrite=overwrite)
        report = out / TRUNCATION
        truncation = json.loads(report.read_text()) if report.is_file() else None
        return {"format": format, "out": str(out), "method": method, "truncation": truncation}
    merge(model)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return {"format": format, "out": str(out), "method": method, "truncation": None}
