"""The training loop: plain PyTorch, one home. AdamW, linear warmup + cosine decay, gradient clipping
and accumulation, the methods' regularizers and hooks, data-parallel under torchrun, atomic
checkpoints that resume bit-for-bit (same batches, same RNG, same optimizer state)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from svdkit.adapters import api
from svdkit.training.batches import labelled_logits
from svdkit.core.distributed import rank_and_world


@dataclass
class LoopState:
    step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def cosine_with_warmup(total: int, warmup: int) -> Callable[[int], float]:
    """lr multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then cosine down to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model, lr: float, weight_decay: float, total: int, warmup: int, optimizer=None) -> LoopState:
    """AdamW, or the optim method ``optimizer`` (a config, e.g. GaLore; its weight decay set to ``weight_decay``)
    through ``svdkit.optim.build``, over the trainable parameters, with warm-up + cosine decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        from svdkit.optim import build

        optimizer = build(params, dataclasses.replace(optimizer, weight_decay=weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, warmup))
    return LoopState(0, optimizer, scheduler)


def schedule_weight_decay(net, optimizer: torch.optim.Optimizer, step: int, total: int) -> None:
    """Set each param group's weight decay for optimizer step ``step`` (0-based) of ``total`` from the
    method's schedule (``AdapterConfig.weight_decay_at``; constant unless the method anneals it, as SoMA).
    The run's base value is kept in the group as ``initial_weight_decay`` (saved with the optimizer)."""
    method = api.state(net).config
    for group in optimizer.param_groups:
        base = group.setdefault("initial_weight_decay", group["weight_decay"])
        group["weight_decay"] = method.weight_decay_at(base, step, total)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def train_step(
    net, ddp_model, micro_batches: list[dict], loop: LoopState, *, max_grad_norm: float, peak_lr: float, total: int
) -> dict:
    """One optimizer step over ``micro_batches`` (this rank's share of the global batch).

    The task loss is Σ token losses / (labelled tokens in the *global* batch), so accumulation and
    data parallelism give exactly the gradient of one big batch; the regularizer is added once per step.
    An output-space regularizer (BA-LoRA) sees each micro-batch's logits at its labelled positions (the
    logits the task loss scores) and is averaged over the micro-batches.
    """
    rank, world = rank_and_world()
    adapted = getattr(net, "_svdkit", None) is not None  # a plain model (svdkit pretrain) has no method hooks
    local_tokens = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in micro_batches)
    counts = torch.tensor([float(local_tokens)])
    if world > 1:
        torch.distributed.all_reduce(counts)
    n_tokens = max(1.0, float(counts[0]))
    loss_total = 0.0
    uses_outputs = api.uses_outputs(net)  # BA-LoRA: a loss on the logits at the labelled positions
    for j, mb in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or ddp_model is net else ddp_model.no_sync()
        with sync:
            logits, targets = labelled_logits(ddp_model, mb)
            loss_sum = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
            loss = loss_sum * (world / n_tokens)
            if uses_outputs:  # a per-micro-batch statistic: averaged over micro-batches (and ranks, by DDP)
                loss = loss + api.output_regularization(net, mb, logits) / len(micro_batches)
            if last and adapted:
                loss = loss + api.regularization(net)
            loss.backward()
        loss_total += float(loss_sum.detach())
    params = [p for g in loop.optimizer.param_groups for p in g["params"]]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    lr = loop.scheduler.get_last_lr()[0]
    if adapted:
        api.after_clipping(net, peak_lr)
        schedule_weight_decay(net, loop.optimizer, loop.step, total)
    loop.optimizer.step()
    loop.scheduler.step()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.step += 1
    if adapted:
        api.after_step(net, loop.step, total)
    summed = torch.tensor([loss_total])
    if world > 1:
        torch.distributed.all_reduce(summed)
    return {"step": loop.step, "loss": float(summed[0]) / n_tokens, "lr": lr, "grad_norm": grad_norm,
            "tokens": int(n_tokens)}  # fmt: skip
