"""compress_delta: task-vector compression of one fine-tuned model relative to its base (Delta-CoMe, ImPart).

Streams the two checkpoints tensor by tensor (as :func:`svdkit.merge_models` does): each 2-D matrix not
matched by ``exclude`` is replaced by W_0 + Δ̂ with Δ̂ = the method's compressed Δ = W_ft − W_0; every
other tensor (embeddings and the output head by default, norms, biases) keeps its fine-tuned value and is
reported as uncompressed. Returns the reconstructed fine-tuned model (a new model; inputs are untouched) and
a report: per module the storage (bits or parameters per delta entry) and the relative error ‖Δ − Δ̂‖/‖Δ‖,
and totals; with ``loss_fn(model) -> float`` also the task loss of base, fine-tuned and reconstructed
models and the fraction of the fine-tune's improvement retained, (L_base − L_rec) / (L_base − L_ft).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from svdkit.core.linalg_merge import relative_error
from svdkit.merging.common import is_matrix
from svdkit.merging.engine import result_model
from svdkit.merging.sources import Checkpoint, open_checkpoint

EXCLUDE = r"(^|\.)(embed_tokens|lm_head|wte|wpe|embeddings?|word_embeddings|position_embeddings)(\.|$)"


def compress_delta(base, finetuned, cfg, *, exclude: str = EXCLUDE, loss_fn=None, progress: bool | None = None) -> tuple[nn.Module, dict]:
    """(reconstructed fine-tuned model, report) for ``cfg`` = ``svdkit.config("delta-come", bits=1.0)`` or
    ``svdkit.config("impart", density=0.1)``. ``base``/``finetuned``: models or Hugging Face folders."""
    from tqdm.auto import tqdm

    if not getattr(cfg, "delta_compression", False):
        raise ValueError(f"compress_delta needs a task-vector compression config (delta-come, impart), got {type(cfg).__name__}.")
    b, f = open_checkpoint(base, "base"), open_checkpoint(finetuned, "finetuned")
    if set(b.keys()) != set(f.keys()):
        raise ValueError(f"base and fine-tuned models have different tensors ({sorted(set(b.keys()) ^ set(f.keys()))[:3]}); not the same architecture.")
    result = result_model(f)
    targets = result.state_dict(keep_vars=True)
    modules, skipped, storage, entries = {}, [], 0.0, 0
    unit = "bits_per_entry" if "bits" in {x for x in cfg.to_dict()} else "params_per_entry"
    for key in tqdm(f.keys(), desc=f"compress_delta {cfg.name}", disable=None if progress is None else not progress):
        W0, W1 = b.get(key), f.get(key)
        if W0.shape != W1.shape:
            raise ValueError(f"tensor {key}: base {tuple(W0.shape)} vs fine-tuned {tuple(W1.shape)}.")
        if key not in targets:
            raise ValueError(f"the reconstructed model has no parameter {key!r}.")
        if not (W1.dtype.is_floating_point and is_matrix(W1)) or re.search(exclude, key):
            skipped.append(key)
            continue
        delta = W1.double() - W0.double()
        approx, stats = cfg.compress(delta, key)
        with torch.no_grad():
            targets[key].copy_((W0.double() + approx).to(targets[key].dtype))
        stats["relative_error"] = relative_error(delta, approx)
        modules[key] = stats
        storage += stats[unit] * delta.numel()
        entries += delta.numel()
    report = {"method": cfg.to_dict(), "modules": modules, "uncompressed": skipped,
              unit: storage / max(entries, 1), "compressed_entries": entries,
              "mean_relative_error": sum(m["relative_error"] for m in modules.values()) / max(len(modules), 1)}  # fmt: skip
    if loss_fn is not None:
        losses = {"base": float(loss_fn(_model(b))), "finetuned": float(loss_fn(_model(f))), "reconstructed": float(loss_fn(result))}
        gain = losses["base"] - losses["finetuned"]
        report["loss"] = losses
        report["retained"] = (losses["base"] - losses["reconstructed"]) / gain if gain != 0 else float("nan")
    return result, report


def _model(ckpt: Checkpoint) -> nn.Module:
    return ckpt.model if ckpt.model is not None else result_model(ckpt)
