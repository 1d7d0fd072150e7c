"""Argument checks shared by every config: one validator, one wording of its errors.

    check_number(self, "gamma", self.gamma, low=0, finite=True)   # "SORSA: gamma must be a finite number >= 0, got …"

The owner (a config instance, class or name) starts the message, so a bad option names the method and
the field, states what is allowed and shows what was given.
"""

from __future__ import annotations

import math


def _owner(owner) -> str:
    if isinstance(owner, str):
        return owner
    return owner.__name__ if isinstance(owner, type) else type(owner).__name__


def describe(low=None, high=None, low_open: bool = False, high_open: bool = False, integer: bool = False,
             finite: bool = False) -> str:  # fmt: skip
    """The allowed set in words: "a finite number >= 0", "an integer >= 1", "a number in (0, 1]"."""
    noun = "an integer" if integer else ("a finite number" if finite else "a number")
    if low is not None and high is not None:
        return f"{noun} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{noun} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{noun} {'<' if high_open else '<='} {high}"
    return noun


def check_number(owner, field: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, finite: bool = False) -> None:  # fmt: skip
    """Raise ``ValueError("{owner}: {field} must be {describe(...)}, got {value!r}.")`` unless ``value`` is one.

    Booleans are refused (``True`` is an ``int`` in Python); ``integer`` accepts only ``int``, otherwise
    ``int`` or ``float``; NaN fails every bound; ``finite`` also refuses ±inf.
    """
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    ok = ok and not (isinstance(value, float) and math.isnan(value))
    ok = ok and (not finite or math.isfinite(value))
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        allowed = describe(low, high, low_open, high_open, integer, finite)
        raise ValueError(f"{_owner(owner)}: {field} must be {allowed}, got {value!r}.")
