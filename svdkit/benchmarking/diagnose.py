"""Measurements a bench cell takes besides losses: process memory and intruder dimensions."""

from __future__ import annotations

from svdkit.adapters.api import adapted_layers
from svdkit.inspection.diagnostics import intruder_dimensions


def status_kib(key: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, …) in KiB; 0 where there is no /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0  # not Linux: memory is reported as 0


def rss_kib() -> int:
    return status_kib("VmRSS")


def peak_kib() -> int:
    """The process's resident high-water mark since the last :func:`reset_peak` (or its start)."""
    return status_kib("VmHWM")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Hand glibc's freed-but-retained heap back to the OS, so a baseline RSS does not include garbage that
    the next allocation would silently reuse (which would hide part of a peak)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False


def intruder_summary(model, max_layers: int, k: int = 10, eps: float = 0.5) -> dict:
    """Intruder dimensions (svdkit.inspection.diagnostics) of up to ``max_layers`` adapted matrices spread over the
    model: pick i is layer i·⌊L/N⌋ + i (mod L) in module order — evenly spaced, shifted by one module per
    pick so that a repeating block layout (q, k, v, o, gate, up, down) does not always give the same type.
    Returns {"layers", "total", "mean", "per_layer"}."""
    layers = list(adapted_layers(model))
    stride = max(1, len(layers) // max_layers)
    picked = [layers[i] for i in dict.fromkeys((i * stride + i) % len(layers) for i in range(min(max_layers, len(layers))))]
    counts = {}
    for name, layer in picked:
        W0 = layer.original_weight().detach()
        W1 = layer.merged_weight().detach()
        counts[name] = intruder_dimensions(W0, W1, k=min(k, min(W0.shape)), eps=eps)
    total = sum(counts.values())
    return {"layers": len(counts), "total": total, "mean": total / max(1, len(counts)), "per_layer": counts}
