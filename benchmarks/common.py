"""Helpers shared by the benchmark scripts (run them as `.venv/bin/python benchmarks/NAME.py`)."""

from __future__ import annotations

import os

from svdkit.files import write_text


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def write_report(path: str, text: str) -> None:
    """Write a results table atomically, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, text)
