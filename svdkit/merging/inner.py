"""The merge rules LoRA-native methods (KnOTS, Core Space) apply inside their aligned basis."""

from __future__ import annotations

from torch import Tensor

from svdkit.merging.iso_c import iso_merge
from svdkit.merging.task_arithmetic import task_sum
from svdkit.merging.ties import ties_merge
from svdkit.merging.tsv_m import tsv_merge

RULES = ("task-arithmetic", "ties", "tsv-m", "iso-c")


def inner_merge(mats: list[Tensor], rule: str, density: float = 1.0) -> Tensor:
    """Merge same-shaped aligned task matrices with ``rule`` (weights are already folded in); without α."""
    ones = [1.0] * len(mats)
    if rule == "task-arithmetic":
        return task_sum(mats, ones)
    if rule == "ties":
        return ties_merge(mats, ones, density)
    if rule == "tsv-m":
        return tsv_merge(mats, ones)
    return iso_merge(mats, ones)
