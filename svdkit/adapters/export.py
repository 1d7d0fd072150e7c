"""export_peft: a standard PEFT LoRA adapter, relative to the *original* base weights.

PEFT (and vLLM, TGI) compute y = W x + (α'/r')·B' A' x. svdkit's update relative to the original W is
ΔW = s·(B C A − B₀ A₀), an exact LoRA of rank 2r: A' = [A; A₀], B' = [B C, −B₀] (METHODS.md §0). When
one factor is frozen it is exactly rank r: (B C − B₀) A or B (A − A₀). For a method that prunes
(``AdapterConfig.prunes``: AdaLoRA), directions whose diagonal core entry is exactly 0 are left out
(rank nnz(λ) per layer). Methods whose update is not low-rank (SVFT, CLIP-SVD, SALT, …) are refused with a pointer to
the merged export. α' is chosen so that α'/r' = s (α'/√r' = s under rsLoRA).
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


def export_peft(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained``
    loads onto the original base model, reproducing the adapted model's outputs (dropout aside)."""
    from safetensors.torch import save_file

    cfg = state(model).config
    if not cfg.exports_lora:
        raise ValueError(
            f"{type(cfg).__name__}'s update is not low-rank (export rank: {cfg.export_rank}), so there is no exact "
            "PEFT LoRA for it. Ship the merged weights instead: svdkit.merge(model), then model.save_pretrained(dir) "
            "(svdkit finetune --merge does this)."
        )
    tensors, ranks, alphas, conv1d = {}, {}, {}, False
    for name, layer in adapted_layers(model):
        A, B = lora_factors(layer, prune=cfg.prunes)
        r = A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu().contiguous()
        ranks[name] = r
        alphas[name] = layer.scaling * (math.sqrt(r) if cfg.use_rslora else r)
        conv1d = conv1d or layer.fan_in_fan_out
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = cfg.scaling * (math.sqrt(rank) if cfg.use_rslora else rank)
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != rank},
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
    return Path(path)
