"""Fingerprints of base weights, so an adapter refuses to load onto a base it was not made from.

A fingerprint is ``"<hash>:<dtype>:<values>"``: the hash identifies the exact tensor (shape, dtype and a
sample of its bytes); ``values`` are 32 evenly strided elements rounded to bfloat16 (hex), which identify the
same weights stored in another dtype (trained in fp32, served in bf16) without the bytes being equal.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import Tensor

SAMPLE = 4096  # elements hashed per tensor: an evenly strided sample, plus shape and dtype
VALUES = 32  # elements kept, as bfloat16, for the dtype-independent comparison
# Two roundings to bfloat16 (8 significant bits) of the same value, one of them after a detour through
# another dtype (fp16: double rounding), differ by at most one bf16 ulp ≤ 2⁻⁷ relative; 2⁻⁶ leaves margin.
# The absolute floor covers fp16's subnormal range (|x| < 2⁻¹⁴), where fp16 keeps fewer bits than bf16.
RTOL, ATOL = 2.0**-6, 2.0**-14


def _strided(flat: Tensor, count: int) -> Tensor:
    return flat[:: max(1, flat.numel() // count)]


def _values(weight: Tensor) -> Tensor:
    return _strided(weight.detach().reshape(-1), VALUES)[:VALUES].to(torch.bfloat16).cpu()


def tensor_fingerprint(weight: Tensor) -> str:
    """``sha256(shape, dtype, ≤ 4,096 evenly strided elements' bytes)[:16] : dtype : 32 elements as bf16 hex``.

    Sampling keeps this cheap on multi-GB models; any fine-tune or re-initialization changes essentially
    every element, so it changes the sample too.
    """
    flat = weight.detach().reshape(-1)
    sample = _strided(flat, SAMPLE).contiguous().cpu()
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
    values = _values(weight).contiguous().view(torch.int16).numpy().astype("<i2").tobytes().hex()
    return f"{h.hexdigest()[:16]}:{str(weight.dtype).removeprefix('torch.')}:{values}"


def compare(weight: Tensor, fingerprint: str) -> Literal["same", "dtype", "different"]:
    """"same": ``weight`` is the fingerprinted tensor; "dtype": the same weights in another dtype (its sampled
    values agree within bf16 rounding); "different" otherwise (and for an exact-only fingerprint of an older
    svdkit that does not match). Across dtypes only differences larger than bf16's resolution (~1 %) show."""
    if tensor_fingerprint(weight) == fingerprint:
        return "same"
    parts = fingerprint.split(":")
    if len(parts) != 3 or parts[1] == str(weight.dtype).removeprefix("torch."):
        return "different"
    try:
        import numpy as np

        stored = torch.from_numpy(np.frombuffer(bytes.fromhex(parts[2]), dtype="<i2").copy()).view(torch.bfloat16)
    except ValueError:
        return "different"
    now = _values(weight)
    if stored.shape != now.shape:
        return "different"
    a, b = stored.float(), now.float()
    close = (a - b).abs() <= RTOL * torch.maximum(a.abs(), b.abs()) + ATOL
    return "dtype" if bool(close.all()) else "different"


def fingerprint_dtype(fingerprint: str) -> str:
    """The dtype a fingerprint was taken in ("" for an older exact-only fingerprint)."""
    parts = fingerprint.split(":")
    return parts[1] if len(parts) == 3 else ""


def combine(fingerprints: dict[str, str]) -> str:
    """One fingerprint for a set of named tensors (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(fingerprints):
        h.update(f"{name}={fingerprints[name]};".encode())
    return h.hexdigest()[:16]
