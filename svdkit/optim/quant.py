"""Fake quantization for Q-GaLore (https://arxiv.org/abs/2407.08296, §3.3–3.4): tensors stay float, but hold
exactly the values a b-bit block-wise quantized copy would dequantize to, so the training dynamics are those
of the quantized optimizer while the memory saving is reported, not realized (:func:`quantized_bytes`)."""

from __future__ import annotations

import torch
from torch import Tensor


def fake_quantize(x: Tensor, bits: int, group: int = 256, generator: torch.Generator | None = None) -> Tensor:
    """Block-wise asymmetric min/max quantization to ``bits`` bits, dequantized (a new tensor; x untouched).

    x is flattened into blocks of ``group`` values (the last one zero-padded); per block, scale
    s = (max − min)/(2ᵇ − 1), zero z = min, code q = round((x − z)/s) ∈ [0, 2ᵇ − 1], value z + s q.
    With ``generator``, rounding is stochastic (Q-GaLore Eq. 4): ⌊y⌋ + 1 with probability y − ⌊y⌋, else
    ⌊y⌋, so E[value] = x and updates smaller than one step still move the weight in expectation.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"fake_quantize: bits must be in 1..16, got {bits}.")
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % group
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, group)
    lo, hi = blocks.min(dim=1, keepdim=True).values, blocks.max(dim=1, keepdim=True).values
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    y = (blocks - lo) / scale
    if generator is None:
        q = torch.round(y)
    else:
        noise = torch.rand(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        q = torch.floor(y + noise)
    q = q.clamp(0, 2**bits - 1)
    out = (lo + scale * q).reshape(-1)[: flat.numel()]
    return out.view_as(x).to(x.dtype)


def quantized_bytes(numel: int, bits: int, group: int = 256) -> int:
    """Bytes of a ``bits``-bit block-wise copy of ``numel`` values: the codes plus an fp16 scale and zero
    per block of ``group``."""
    blocks = -(-numel // group)
    return -(-numel * bits // 8) + 4 * blocks
