"""Batches and losses: the order of training items, global batches and their shards, padding, and the
token-weighted loss over labelled positions.

    batch = collate(shard(batch_at(train, step, 8, seed=0), rank, world), pad_id)
    loss, n = token_loss_sum(model, batch)          # Σ cross-entropy over labelled next tokens, their count
    mean, ppl = eval_loss(model, heldout, batch_size=8, pad_id=pad_id)

Items are the examples of :mod:`svdkit.training.data` (``{"input_ids": list[int], "labels": list[int]}``,
labels ``IGNORE`` where no loss is taken). Everything here is a pure function of its inputs (and the seed).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import sys

import torch

IGNORE = -100  # the label of positions that take no loss (Hugging Face's ignore_index)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:8], "little") >> 1


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The item order of one epoch: a permutation of range(n) fixed by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch))).tolist()


def batch_at(train_items, step: int, batch_size: int, seed: int, group: int = 16) -> list[dict]:
    """The items of global batch ``step`` (0-based): a pure function of (items, step, batch_size, seed).

    An epoch is ceil(n / batch_size) steps through ``epoch_order``; its last batch is short when
    batch_size does not divide n, so every item is seen exactly once per epoch. Within each window of
    ``group`` consecutive batches the items are sorted by length (stable), so a batch holds examples of
    similar length and little padding (``group=1``: the plain shuffled order). Resuming at step k gives
    the batches an uninterrupted run would have seen.
    """
    n = len(train_items)
    if n == 0 or batch_size < 1 or step < 0 or group < 1:
        raise ValueError(f"batch_at needs items, batch_size >= 1, step >= 0, group >= 1; got {n}, {batch_size}, {step}, {group}")
    steps_per_epoch = math.ceil(n / batch_size)
    epoch, i = divmod(step, steps_per_epoch)
    order = epoch_order(n, epoch, seed)
    first = i // group * group * batch_size  # the window holding batch i
    window = order[first : first + group * batch_size]
    if group > 1:
        window.sort(key=lambda j: len(train_items[j]["input_ids"]))
    offset = i * batch_size - first
    return [train_items[j] for j in window[offset : offset + batch_size]]


def shard(batch: list, rank: int, world_size: int) -> list:
    """Rank's contiguous share of a global batch; shares differ in size by at most 1 (and may be empty)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return batch[start: start + base + (rank < extra)]


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding), all int64."""
    if not items:
        raise ValueError("cannot collate an empty list of examples")
    shape = (len(items), max(len(x["input_ids"]) for x in items))
    out = {"input_ids": torch.full(shape, int(pad_id)), "attention_mask": torch.zeros(shape, dtype=torch.long),
           "labels": torch.full(shape, IGNORE)}
    for r, x in enumerate(items):
        n = len(x["input_ids"])
        out["input_ids"][r, :n], out["labels"][r, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"])
        out["attention_mask"][r, :n] = 1
    return out


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled positions, their count) for a collated batch."""
    logits, targets = labelled_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"), len(targets)


def labelled_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (n, vocab), next tokens (n,)) at the n positions whose next token is labelled, in
    (batch, position) order: the outputs token_loss_sum scores (and BA-LoRA's regularizers see).

    Where the model accepts a boolean ``logits_to_keep`` (Hugging Face causal LMs), the output head runs
    only at those positions: prompts and padding cost no vocabulary projection.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    if _keeps_logits_by_mask(model):  # no try/except: an error here (out of memory, a bug) is the caller's to see
        mask = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)  # position t predicts token t + 1
        logits = model(**inputs, logits_to_keep=mask).logits
        if logits.shape[:-1] == (n,):
            return logits, targets[keep]
        object.__setattr__(getattr(model, "module", model), "_svdkit_mask_logits", False)  # it slices another way
    return select_labelled(model(**inputs).logits, batch["labels"]), targets[keep]


def select_labelled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows of full (batch, seq, vocab) logits at positions whose next token is labelled, as labelled_logits."""
    return logits[:, :-1][labels[:, 1:].to(logits.device) != IGNORE]


def _keeps_logits_by_mask(model) -> bool:
    """Does ``model`` (or the module DDP wraps) take a boolean (batch, seq) ``logits_to_keep``? Decided once,
    statically: its forward takes ``logits_to_keep`` and its class's module slices with transformers'
    ``slice_logits_to_keep`` (which reads a boolean mask), so the call itself is never guarded."""
    inner = getattr(model, "module", model)
    cached = getattr(inner, "_svdkit_mask_logits", None)
    if cached is None:
        module = sys.modules.get(type(inner).__module__)
        takes = "logits_to_keep" in inspect.signature(inner.forward).parameters
        cached = takes and getattr(module, "slice_logits_to_keep", None) is not None
        object.__setattr__(inner, "_svdkit_mask_logits", cached)
    return cached


def eval_loss(model, items: list[dict], batch_size: int, pad_id: int) -> tuple[float, float]:
    """(mean loss, perplexity): token-weighted mean cross-entropy over the labelled tokens of ``items`` (position 0
    is never predicted, so not counted), under no_grad in eval mode; the training mode is restored after."""
    if not items:
        raise ValueError("eval_loss needs at least one example")
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            items = sorted(items, key=lambda x: len(x["input_ids"]))  # similar lengths together: little padding
            for i in range(0, len(items), batch_size):
                loss, n = token_loss_sum(model, collate(items[i: i + batch_size], pad_id))
                total, count = total + loss.item(), count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the examples have no labelled tokens to evaluate")
    mean = total / count
    return mean, math.exp(mean) if mean < 700 else math.inf
