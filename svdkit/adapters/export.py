"""export_peft: a standard PEFT LoRA adapter, relative to the *original* base weights.

PEFT (and vLLM, TGI) compute y = W x + (α'/r')·B' A' x. svdkit's update relative to the original W is
ΔW = s·(B C A − B₀ A₀), an exact LoRA of rank 2r: A' = [A; A₀], B' = [B C, −B₀] (METHODS.md §0). When
one factor is frozen it is exactly rank r: (B C − B₀) A or B (A − A₀). For a method that prunes
(``AdapterConfig.prunes``: AdaLoRA), directions whose diagonal core entry is exactly 0 are left out
(rank nnz(λ) per layer). α' is chosen so that α'/r' = s (α'/√r' = s under rsLoRA).

Methods whose update is not low-rank (SVFT, CLIP-SVD, SALT, …) have no exact LoRA: without ``rank`` they are
refused with a pointer to the merged export; with ``rank=R`` every layer's update is replaced by its best
rank-R approximation ΔW_R = U_R Σ_R V_Rᵀ (Eckart–Young; from the factors by QR when the update is held as
B' A', else from the dense ΔW), exported as B' = U_R Σ_R^½, A' = Σ_R^½ V_Rᵀ with α' = r' (s' = 1), and the
relative error ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F of each layer is written to ``truncation.json`` beside the adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from svdkit.adapters.api import adapted_layers, state
from svdkit.core.files import atomic_dir
from svdkit.adapters.layers import SpectralLinear
from svdkit.core.linalg import svd_exact
from svdkit.core.linalg_lowrank import factored_svd, numerical_rank, truncation_error

TRUNCATION = "truncation.json"


def lora_factors(layer: SpectralLinear, prune: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A', lora_B') with s·B' A' = the layer's ΔW relative to its original weight."""
    A, Bc = layer.lora_A, layer.output_factor()
    if A is None or Bc is None:
        raise ValueError(f"this layer's update acts on the full {layer.out_features}×{layer.in_features} weight; "
                         "it has no low-rank factors to export.")
    A, Bc = A.detach(), Bc.detach()
    if layer.init_A is None:
        return _without_zero_directions(layer, A, Bc) if prune else (A, Bc)
    A0, B0 = layer.init_A, layer.init_B
    if "A" not in layer.trainable and torch.equal(A0, A):  # shared input basis: (B C − B₀) A, rank r
        return A, Bc - B0
    if "B" not in layer.trainable and layer.core is None and torch.equal(B0, Bc):
        return A - A0, Bc
    return torch.cat([A, A0], 0), torch.cat([Bc, -B0], 1)


def _without_zero_directions(layer: SpectralLinear, A: torch.Tensor, Bc: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the directions i whose diagonal core entry cᵢ is exactly 0: they add nothing to B diag(c) A
    (AdaLoRA's pruned triplets), so the export has rank nnz(c). One is kept if all are 0 (PEFT needs r ≥ 1)."""
    c = layer.core() if layer.core is not None else None
    if c is None or c.ndim != 1 or c.shape[0] != A.shape[0]:
        return A, Bc
    keep = c.detach() != 0
    if bool(keep.all()):
        return A, Bc
    if not bool(keep.any()):
        keep[0] = True
    return A[keep], Bc[:, keep]


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


def truncated_lora_factors(layer: SpectralLinear, rank: int, low_rank: bool, prune: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(lora_A', lora_B', report) with B' A' the best rank-``rank`` approximation of the layer's ΔW (scaling
    1); report = {"rank", "update_rank", "relative_error"}. A ``low_rank`` method's update is decomposed from
    its LoRA factors (never forming the m×n product); a full-spectrum update from the dense ΔW."""
    if low_rank:
        A, B = lora_factors(layer, prune=prune)
        U, S, Vh = factored_svd(layer.scaling * B.double(), A.double())
    else:
        delta = layer.delta_weight().detach()
        U, S, Vh = svd_exact(delta, min(delta.shape), dtype=torch.float64)
    keep = max(1, min(rank, numerical_rank(S)))
    root = S[:keep].sqrt()
    dtype = layer.weight_dtype
    report = {"rank": keep, "update_rank": numerical_rank(S), "relative_error": truncation_error(S, keep)}
    return (root[:, None] * Vh[:keep]).to(dtype), (U[:, :keep] * root).to(dtype), report


def export_peft(model: nn.Module, path: str | os.PathLike, *, rank: int | None = None, overwrite: bool = False) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained``
    loads onto the original base model, reproducing the adapted model's outputs (dropout aside).

    ``rank=R`` exports the best rank-R approximation of every layer's update instead (the only PEFT form of a
    full-rank update: SVFT, SALT, CLOVER, SoKA, …) and writes each layer's truncation error to
    ``truncation.json``; layers whose update already has rank ≤ R are exported exactly."""
    from safetensors.torch import save_file

    cfg = state(model).config
    if rank is None and not cfg.exports_lora:
        raise ValueError(
            f"{type(cfg).__name__}'s update is not low-rank (export rank: {cfg.export_rank}), so there is no exact "
            "PEFT LoRA for it. Ship the merged weights instead: svdkit.merge(model), then model.save_pretrained(dir) "
            "(svdkit finetune --merge does this), or export a truncated LoRA with export_peft(model, dir, rank=R) "
            "(svdkit export RUN --format peft --rank R), which reports the truncation error per layer."
        )
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"export rank must be a positive integer, got {rank!r}.")
    tensors, ranks, alphas, conv1d, truncation = {}, {}, {}, False, {}
    for name, layer in adapted_layers(model):
        if rank is not None and layer.lora_bias is not None:
            raise ValueError(f"{name}: the update trains the bias, which a LoRA adapter cannot carry; "
                             "ship the merged weights instead (svdkit export RUN --format merged).")
        if rank is None:
            A, B = lora_factors(layer, prune=cfg.prunes)
            scale = layer.scaling
        else:
            A, B, truncation[name] = truncated_lora_factors(layer, rank, cfg.exports_lora, prune=cfg.prunes)
            scale = 1.0
        r = A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu().contiguous()
        ranks[name] = r
        alphas[name] = scale * (math.sqrt(r) if cfg.use_rslora else r)
        conv1d = conv1d or layer.fan_in_fan_out
    rank_mode = Counter(ranks.values()).most_common(1)[0][0]
    alpha = (cfg.scaling if rank is None else 1.0) * (math.sqrt(rank_mode) if cfg.use_rslora else rank_mode)
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": rank_mode,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank_mode},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": conv1d,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    with atomic_dir(path, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
        if truncation:
            errors = [t["relative_error"] for t in truncation.values()]
            summary = {"rank": rank, "max_relative_error": max(errors), "mean_relative_error": sum(errors) / len(errors)}
            (tmp / TRUNCATION).write_text(json.dumps({**summary, "layers": truncation}, indent=2) + "\n")
    return Path(path)
