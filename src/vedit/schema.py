"""Checks of what vedit reads back from its own files (the project record, checkpoint records):
types, ranges, finite numbers. A file edited by hand or damaged then fails at once with one
sentence naming the key, not later in whatever code first uses the value.

A check is a function `(value, where)` that raises `Invalid`; these build them. Keys a check
does not name are let through, so a newer vedit of the same format may add some.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vedit.errors import VeditError
from vedit.settings import resolve

Check = Callable[[Any, str], None]


class Invalid(Exception):
    """A value that is not what its key must hold."""

    def __init__(self, where: str, value: Any, wanted: str) -> None:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        super().__init__(f"{where} = {shown} ({wanted})")
        self.where = where


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int | None = None, high: int | None = None) -> Check:
    """A whole number (not a bool), within [low, high] where given."""
    wanted = "a whole number" + _range(low, high)

    def check(value: Any, where: str) -> None:
        if not _is_int(value) or (low is not None and value < low) or (
                high is not None and value > high):
            raise Invalid(where, value, wanted)
    return check


def number(low: float | None = None, *, above: float | None = None) -> Check:
    """A finite number, at least `low` or more than `above` where given."""
    wanted = "a finite number" + (f" of {low:g} or more" if low is not None else "") + (
        f" above {above:g}" if above is not None else "")

    def check(value: Any, where: str) -> None:
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or (
                low is not None and value < low) or (above is not None and value <= above):
            raise Invalid(where, value, wanted)
    return check


def text(pattern: str = r".+") -> Check:
    """A string matching `pattern` whole (by default: any non-empty string)."""
    form = re.compile(pattern, re.DOTALL)

    def check(value: Any, where: str) -> None:
        if not isinstance(value, str) or not form.fullmatch(value):
            raise Invalid(where, value, "a string" if pattern == r".+" else
                          f"a string of the form {pattern}")
    return check


def items(each: Check, *, at_least: int = 0) -> Check:
    """A list of at least `at_least` values, each passing `each`."""
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) < at_least:
            raise Invalid(where, value, f"a list of {at_least} or more" if at_least else "a list")
        for index, item in enumerate(value):
            each(item, f"{where}[{index}]")
    return check


def table(fields: Mapping[str, Check], *, required: Iterable[str] = (),
          rule: Callable[[dict[str, Any]], str | None] | None = None) -> Check:
    """A table whose `fields` pass their checks (those in `required` must be there), and which
    passes `rule`, a check across its fields that says what is wrong, or None."""
    needed = tuple(required)

    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, value, "a table")
        for key in needed:
            if key not in value:
                raise Invalid(f"{where}.{key}" if where else key, None, "missing")
        for key, field_check in fields.items():
            if key in value:
                field_check(value[key], f"{where}.{key}" if where else key)
        problem = rule(value) if rule is not None else None
        if problem:
            raise Invalid(where, "...", problem)
    return check


def settings_of(cls: type) -> Check:
    """A table of `cls`'s settings (a vedit.settings dataclass) that its own rules accept."""
    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise Invalid(where, value, "a table")
        try:
            resolve(cls, value)
        except VeditError as exc:
            raise Invalid(where, "...", exc.message.rstrip(".")) from None
    return check


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" from {low} to {high}"
    if low is not None:
        return f" of {low} or more"
    return f" up to {high}" if high is not None else ""
