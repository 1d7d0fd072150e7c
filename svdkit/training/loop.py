"""The training loop: plain PyTorch, one home. AdamW, linear warmup + cosine decay, gradient clipping
and accumulation, the methods' regularizers and hooks, two data splits for bi-level methods (BiLoRA:
``data_splits``, ``split_schedule``, ``train_step(split=…)``), data-parallel under torchrun, atomic
checkpoints that resume bit-for-bit (same batches, same RNG, same optimizer state)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Callable, Iterator

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


def data_splits(net, train_items: list, seed: int) -> dict[int, list]:
    """The training items by split: {1: all items}, or for a method with a second split (BiLoRA) {1: D₁, 2: D₂},
    D₂ = a seeded ``second_split()`` share of the items (at least 1; same rule as the held-out split)."""
    method = api.state(net).config if getattr(net, "_svdkit", None) is not None else None
    fraction = method.second_split() if method is not None else 0.0
    if not fraction:
        return {1: list(train_items)}
    from svdkit.training.data import split

    if len(train_items) < 2:
        raise ValueError(f"{type(method).__name__} trains on two splits of the training data, which has only "
                         f"{len(train_items)} item(s); give it at least 2.")  # fmt: skip
    first, second = split(train_items, fraction, seed + 1)  # seed + 1: not the held-out split's permutation
    return {1: first, 2: second}


def split_schedule(net, start: int = 0) -> Iterator[tuple[int, int]]:
    """(split, i) for steps ``start``, ``start + 1``, …: step t trains on split ``method.split_at(t)`` and is that
    split's i-th step (0-based), so each split walks through its own epochs (``batch_at(splits[split], i, …)``)
    and a run resumed at ``start`` draws what the uninterrupted run drew. One split: (1, t)."""
    method = api.state(net).config if getattr(net, "_svdkit", None) is not None else None
    two = method is not None and method.second_split()
    counts = {1: 0, 2: 0}
    for past in range(start if two else 0):
        split = method.split_at(past)
        counts[split] = counts.get(split, 0) + 1
    t = start
    while True:
        split = method.split_at(t) if two else 1
        if split not in (1, 2):
            raise ValueError(f"{type(method).__name__}.split_at({t}) returned {split!r}; it must be 1 or 2.")
        yield split, (counts[split] if two else t)
        counts[split] += 1
        t += 1


def split_step(net, step: int) -> tuple[int, int]:
    """(split, i) of step ``step`` alone (see :func:`split_schedule`)."""
    return next(split_schedule(net, step))


def check_one_stream(net, who: str) -> None:
    """Refuse a two-split method (BiLoRA) where ``who`` (e.g. the Hugging Face Trainer) has one data stream."""
    st = getattr(net, "_svdkit", None)
    if st is not None and st.config.second_split():
        raise ValueError(f"{type(st.config).__name__} trains on two splits of the data, which {who} does not offer; "
                         "use svdkit's loop (svdkit finetune, or svdkit.training.loop with data_splits/split_step).")


def drop_other_split_gradients(net, split: int) -> None:
    """Set to None the gradients of the adapter tensors that do not train on ``split`` (``split_of``), so the
    optimizer leaves them alone this step (no moment update, no weight decay) and clipping ignores them."""
    st = api.state(net)
    for name, layer in api.adapted_layers(net):
        mcfg = st.module_configs[name]
        for tensor, param in layer.adapter_parameters():
            if mcfg.split_of(tensor) != split:
                param.grad = None


def train_step(
    net, ddp_model, micro_batches: list[dict], loop: LoopState, *, max_grad_norm: float, peak_lr: float, total: int,
    split: int | None = None,
) -> dict:
    """One optimizer step over ``micro_batches`` (this rank's share of the global batch).

    The task loss is Σ token losses / (labelled tokens in the *global* batch), so accumulation and
    data parallelism give exactly the gradient of one big batch; the regularizer is added once per step.
    An output-space regularizer (BA-LoRA) sees each micro-batch's logits at its labelled positions (the
    logits the task loss scores) and is averaged over the micro-batches. ``split`` (two-split methods, see
    :func:`split_step`): only the adapter tensors of that split are updated.
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
    if split is not None and adapted:
        drop_other_split_gradients(net, split)
    params = [p for g in loop.optimizer.param_groups for p in g["params"] if p.grad is not None]
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
