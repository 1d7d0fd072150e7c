"""``build``, ``parametrize`` and honest memory accounting for the optim family."""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn

from svdkit.core.registry import config

_ATTN = re.compile(r"(^|\.)(q|k|v)_proj$")  # Llama-style attention projections (GaLore+ head sharing)


def _resolve(cfg):
    cfg = config(cfg) if isinstance(cfg, str) else cfg
    if getattr(cfg, "kind", None) != "optim":
        raise ValueError(f"{type(cfg).__name__} is not an optimizer config; pick one of svdkit.methods('optim').")
    return cfg


def param_groups(model: nn.Module, share_heads: bool = False) -> list[dict]:
    """Groups for a model: trainable matrices → low-rank (``low_rank=True``); embedding tables, the output
    head, vectors (norms, biases) → plain AdamW (``low_rank=False``), as in GaLore's benchmark. With
    ``share_heads`` (GaLore+), Llama-style ``q_proj``/``k_proj``/``v_proj`` get a group with their head count."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        skip.add(id(head.weight))
    cfg = getattr(model, "config", None)
    heads = {"q": getattr(cfg, "num_attention_heads", 0)}
    heads["k"] = heads["v"] = getattr(cfg, "num_key_value_heads", None) or heads["q"]
    low, plain, by_heads, seen = [], [], {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim != 2 or id(p) in skip:
            plain.append(p)
            continue
        match = _ATTN.search(name.rsplit(".", 1)[0]) if share_heads else None
        if match and heads[match.group(2)]:
            by_heads.setdefault(heads[match.group(2)], []).append(p)
        else:
            low.append(p)
    groups = [{"params": low, "low_rank": True}] + [{"params": ps, "low_rank": True, "heads": h} for h, ps in by_heads.items()]
    groups.append({"params": plain, "low_rank": False})
    return [g for g in groups if g["params"]]


def build(params: nn.Module | Iterable, cfg, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer of registered optim method ``cfg`` (a config or its name) with learning rate ``lr``
    (None: the method's default). ``params``: a model (groups from :func:`param_groups`), parameters, or
    param groups (a group's ``low_rank`` picks low-rank vs plain AdamW; default: every matrix is low-rank)."""
    cfg = _resolve(cfg)
    lr = cfg.default_lr if lr is None else lr
    if getattr(cfg, "parametrizes", False):
        if not isinstance(params, nn.Module):
            raise ValueError(f"{cfg.name} is a parametrization for training from scratch: pass the model, after "
                             f"svdkit.optim.parametrize(model, cfg) (CLI: `svdkit pretrain --optimizer {cfg.name}`; "
                             "`svdkit finetune --optimizer` takes the GaLore family, adamw or muon).")
        return cfg.make_for(params, lr)
    if isinstance(params, nn.Module):
        groups = param_groups(params, getattr(cfg, "share_heads", False))
    else:
        items = list(params)
        groups = items if items and isinstance(items[0], dict) else [{"params": items}]
        groups = [dict(g) for g in groups]
    if not any(g["params"] for g in groups):
        raise ValueError("svdkit.optim.build: no trainable parameters (every requires_grad is False?).")
    return cfg.make(groups, lr)


def parametrize(model: nn.Module, cfg) -> nn.Module:
    """Swap the target linears of ``model`` for the trainable form of parametrization ``cfg`` (SST, LOST),
    in place; returns the model. Then ``build(model, cfg, lr)`` makes its optimizer."""
    cfg = _resolve(cfg)
    if not getattr(cfg, "parametrizes", False):
        raise ValueError(f"{cfg.name} is an optimizer, not a parametrization: build(model, cfg) is all it needs.")
    return cfg.parametrize(model)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments, projectors, indices): what it really holds."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def memory_report(optimizer: torch.optim.Optimizer) -> dict:
    """``state_bytes`` (held now) and, for fake-quantized optimizers (Q-GaLore), ``quantized_state_bytes``
    (the projectors at ``proj_bits``) and ``weight_bytes_saved`` (weights at ``weight_bits`` instead of
    their dtype): what a real low-bit implementation would save."""
    from svdkit.optim.quant import quantized_bytes

    out = {"state_bytes": state_bytes(optimizer), "quantized_state_bytes": 0, "weight_bytes_saved": 0}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for key, v in st.items():
                if not isinstance(v, torch.Tensor):
                    continue
                bits = group.get("proj_bits") if key == "proj" else None
                out["quantized_state_bytes"] += quantized_bytes(v.numel(), bits, group["quant_group"]) if bits else v.numel() * v.element_size()
            if group.get("weight_bits") and st:
                out["weight_bytes_saved"] += p.numel() * p.element_size() - quantized_bytes(p.numel(), group["weight_bits"], group["quant_group"])
    return out
