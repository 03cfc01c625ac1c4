"""Checks of a setting's value that fail with ONE line naming the flag: ``<name>=<value> must be <condition>, in
--<flag>; <what to do>``. Every command's argument groups and functions use these."""

from __future__ import annotations

import math


def fail(name: str, value: object, condition: str, fix: str, flag: str | None) -> None:
    """Raise the one-line ValueError: ``<name>=<value> must be <condition>, in <flag or --name>; <fix>``."""
    raise ValueError(f"{name}={value!r} must be {condition}, in {flag or '--' + name}; {fix}")


def check_at_least(
    name: str, value: float | None, minimum: float, fix: str, *, flag: str | None = None, optional: bool = False
) -> None:
    """Raise a one-line ValueError naming ``flag`` (default ``--name``) unless ``value >= minimum``.

    ``optional``: None is allowed (it means "off" or "default" for that setting).
    """
    if value is None and optional:
        return
    if value is None or not (math.isfinite(value) and value >= minimum):
        fail(name, value, f">= {minimum}", fix, flag)


def check_positive(
    name: str, value: float | None, fix: str, *, flag: str | None = None, optional: bool = False
) -> None:
    """``value >= 1`` for an int (a count: devices, steps, sequences), ``value > 0`` for a float (a rate)."""
    if value is None and optional:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        check_at_least(name, value, 1, fix, flag=flag)
    elif value is None or not (math.isfinite(value) and value > 0):
        fail(name, value, "> 0", fix, flag)


def check_between(
    name: str,
    value: float,
    low: float,
    high: float,
    fix: str,
    *,
    low_open: bool = False,
    high_open: bool = False,
    flag: str | None = None,
) -> None:
    """``low <= value <= high``; ``low_open``/``high_open`` make that end strict."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):  # also catches NaN
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        fail(name, value, f"in {interval}", fix, flag)


def check_choice(name: str, value: str, choices: tuple[str, ...], *, flag: str | None = None) -> None:
    if value not in choices:
        fail(name, value, f"one of {', '.join(choices)}", "pick one of those", flag)
