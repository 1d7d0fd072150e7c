"""Fingerprints of base weights, so an adapter refuses to load onto a base it was not made from."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

SAMPLE = 4096  # elements hashed per tensor: an evenly strided sample, plus shape and dtype


def tensor_fingerprint(weight: Tensor) -> str:
    """sha256 (hex, 16 chars) of a tensor's shape, dtype and ≤ 4,096 evenly strided elements' bytes.

    Sampling keeps this cheap on multi-GB models; any fine-tune or re-initialization changes
    essentially every element, so it changes the sample too.
    """
    flat = weight.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE)
    sample = flat[::stride].contiguous().cpu()
    h = hashlib.sha256(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def combine(fingerprints: dict[str, str]) -> str:
    """One fingerprint for a set of named tensors (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(fingerprints):
        h.update(f"{name}={fingerprints[name]};".encode())
    return h.hexdigest()[:16]
