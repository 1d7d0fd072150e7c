"""Full fine-tuning of the target linears, as a preset: the reference row of `svdkit bench`.

Every target weight trains: W' = W + (C − C₀) with C a trainable m × n matrix initialized to W and C₀ its
frozen copy (``cores.Delta``), so y = W x + (C − C₀) x is exactly the base model at init and its gradient
w.r.t. C is the full-weight gradient. Covers the target linears only (not embeddings, norms or the head).
"""

from __future__ import annotations

from dataclasses import dataclass

from svdkit.adapters.config import AdapterConfig
from svdkit.core.registry import register
from svdkit.adapters.cores import Delta
from svdkit.adapters.layers import Init


@register
@dataclass(frozen=True)
class Full(AdapterConfig):
    """Full fine-tuning of every target linear (no paper: the baseline of e.g. https://arxiv.org/abs/2106.09685).

    ΔW = C − C₀ with C = W at init, all m·n entries trained; s = 1 (alpha=None; ``rank`` is ignored).
    Covers the target linears (not embeddings, norms or the output head). Learning rate 2e-5, the usual
    full-fine-tuning value of instruction tuning (Alpaca/Vicuna recipes); weight decay 0. The update is
    not low-rank: export_peft refuses (merge instead). Memory: a second frozen copy of each weight (C₀)
    plus C and its AdamW moments — the cost full fine-tuning has anyway.
    """

    name = "full"
    basis = "the weight itself"
    trains = "W (every entry of the target linears)"
    params = "m·n"
    export_rank = "full (merge)"
    paper = "https://arxiv.org/abs/2106.09685"
    exports_lora = False
    uses_rank = False
    core_type = Delta
    lr = 2e-5

    def initialize(self, weights, names, calibration=None) -> Init:
        W = weights.to(self.dtype)
        return Init(A=None, B=None, trainable=frozenset(), subtract=False, core={"value": W.clone(), "initial": W.clone()})
