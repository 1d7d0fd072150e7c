"""svdkit.core.checks: the one argument validator's accepted values and its wording."""

from __future__ import annotations

import math

import pytest

from svdkit.core.checks import check_number, describe


class Owner:
    pass


@pytest.mark.parametrize("kwargs,good,bad,words", [
    (dict(low=0, finite=True), [0, 1e-9, 3], [-1e-9, math.inf, math.nan, "1", True, None], "a finite number >= 0"),
    (dict(low=0, low_open=True, finite=True), [1e-9, 2], [0, -1, math.inf], "a finite number > 0"),
    (dict(low=0, high=1, low_open=True), [1e-9, 1], [0, 1.0001, math.nan], "a number in (0, 1]"),
    (dict(low=0, high=1, high_open=True), [0, 0.5], [1, -0.1], "a number in [0, 1)"),
    (dict(low=1, integer=True), [1, 7], [0, 1.0, False, "2"], "an integer >= 1"),
    (dict(high=2), [-math.inf, 2], [2.5], "a number <= 2"),
])  # fmt: skip
def test_check_number_accepts_and_refuses(kwargs, good, bad, words):
    for value in good:
        check_number("M", "x", value, **kwargs)
    for value in bad:
        with pytest.raises(ValueError) as info:
            check_number(Owner(), "x (a note)", value, **kwargs)
        assert str(info.value) == f"Owner: x (a note) must be {words}, got {value!r}."
    assert describe(**kwargs) == words


def test_owner_may_be_a_name_a_class_or_an_instance():
    for owner in ("Owner", Owner, Owner()):
        with pytest.raises(ValueError, match=r"^Owner: gamma must be a number >= 0, got -1\.$"):
            check_number(owner, "gamma", -1, low=0)
