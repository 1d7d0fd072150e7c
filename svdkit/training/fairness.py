"""Training and evaluating on groups of the data (topics, demographics): per-group losses and their spread.

    groups = split_groups(items)                         # {name: examples} by each example's "group"
    train_groups(model, groups, steps=50, lr=1e-4, pad_id=pad)
    report = group_losses(model, heldout_groups, pad_id=pad)   # {"losses": {name: loss}, "spread", "std", ...}

Each step takes one batch from every group (group g's batch with g's singular values active when the
model carries a FairLoRA adapter, :func:`svdkit.adapters.zoo.fairlora.use_group`) and minimizes
mean_g L_g + λ·Var_g(L_g) (λ: the FairLoRA config's ``variance_weight``, else ``variance_weight`` here,
default 0: plain multi-group training for a shared adapter). Group indices are the sorted group names.
"""

from __future__ import annotations

import statistics
from typing import Mapping

import torch

from svdkit.adapters import api
from svdkit.training.batches import batch_at, collate, eval_loss, token_loss_sum
from svdkit.training.loop import make_optimizer


def split_groups(items, min_size: int = 1) -> dict[str, list]:
    """{group name: its examples} for examples carrying a ``group`` (others are left out), sorted by name;
    groups with fewer than ``min_size`` examples are dropped."""
    out: dict[str, list] = {}
    for x in items:
        if x.get("group"):
            out.setdefault(x["group"], []).append(x)
    return {g: out[g] for g in sorted(out) if len(out[g]) >= min_size}


def _context(model, index: int, shared: bool):
    import contextlib

    from svdkit.adapters.zoo.fairlora import use_group

    return contextlib.nullcontext() if shared else use_group(model, index)


def _weight(model, default: float) -> float:
    from svdkit.adapters.zoo.fairlora import FairLoRA

    method = api.state(model).config
    return method.variance_weight if isinstance(method, FairLoRA) else default


def train_groups(model, groups: Mapping[str, list], *, steps: int, lr: float, pad_id: int, batch_size: int = 4,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0, variance_weight: float = 0.0, seed: int = 0,
                 shared: bool = False, progress=None) -> list[dict]:  # fmt: skip
    """Train an adapted ``model`` on every group at each step; returns one row per step (loss per group).
    ``shared=True``: one adapter for all groups (no group switching: a FairLoRA adapter stays on its active group)."""
    from tqdm.auto import tqdm

    from svdkit.adapters.zoo.fairlora import variance_objective

    if not groups or any(not v for v in groups.values()):
        raise ValueError(f"train_groups needs at least one non-empty group; got sizes {({k: len(v) for k, v in groups.items()})}.")
    names = sorted(groups)
    weight = _weight(model, variance_weight)
    loop = make_optimizer(model, lr, weight_decay, steps, max(1, round(0.03 * steps)))
    params = [p for g in loop.optimizer.param_groups for p in g["params"]]
    rows = []
    model.train()
    for step in tqdm(range(steps), desc="svdkit groups", unit="step", disable=not progress if progress is not None else None):
        losses = []
        for i, name in enumerate(names):
            with _context(model, i, shared):
                total, n = token_loss_sum(model, collate(batch_at(groups[name], step, batch_size, seed + i), pad_id))
                losses.append(total / max(n, 1))
        objective = variance_objective(losses, weight) + api.regularization(model)
        objective.backward()  # the cores' active group only changes which σ row a forward reads: grads reach each row
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        api.after_clipping(model, lr)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        loop.step += 1
        api.after_step(model, loop.step, steps)
        rows.append({"step": loop.step, **{n: float(v.detach()) for n, v in zip(names, losses)}})
    model.eval()
    return rows


def group_losses(model, groups: Mapping[str, list], *, pad_id: int, batch_size: int = 8, shared: bool = False) -> dict:
    """Held-out loss of every group (with its own σ where the model has a FairLoRA adapter, group index =
    sorted name order) and their spread: max − min, population std, worst group."""
    names = sorted(groups)
    losses = {}
    for i, name in enumerate(names):
        with _context(model, i, shared):
            losses[name] = eval_loss(model, groups[name], batch_size, pad_id)[0]
    values = list(losses.values())
    return {"losses": losses, "mean": sum(values) / len(values), "spread": max(values) - min(values),
            "std": statistics.pstdev(values), "worst": max(losses, key=losses.get)}  # fmt: skip
