"""Whether a value a user wrote can be a schema field's type, and why not, in the user's words (never OmegaConf's,
which reads 2 as true and lets [[1]] into a list of strings)."""

from __future__ import annotations

import re
import typing
from typing import Any

from .credentials import looks_secret


BOOL_WORDS = ("true", "false", "yes", "no", "on", "off")


def fits(value: Any, tp: Any) -> bool:
    """Whether OmegaConf turns `value` into a `tp` the way a user means it (stricter than OmegaConf itself,
    which reads 2 as true and lets [[1]] into a list of strings)."""
    if tp is Any:
        return True
    if tp is bool:
        return isinstance(value, bool) or isinstance(value, str) and value.strip().lower() in BOOL_WORDS
    if isinstance(value, bool):
        return False
    if tp is int:
        return isinstance(value, int) or isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value) is not None
    if tp is float:
        try:
            float(value)  # an integer of hundreds of digits is no float (OverflowError)
            return isinstance(value, (int, float, str))
        except (TypeError, ValueError, OverflowError):
            return False
    if tp is str:
        return isinstance(value, (str, int, float))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(fits(v, str) for v in value)
    return False


def describe(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(tp) or (
        "a list such as [a, b]" if typing.get_origin(tp) is list else "a mapping such as {name: value}")


def shown(value: Any) -> str:
    """A value as the user wrote it in YAML: null, true, 'text', [..]; a long one cut, a huge integer by its size."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    if isinstance(value, int):
        return number_words(value)
    if isinstance(value, str) and looks_secret("", value):
        return "a value that looks like a token or key (not repeated here)"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} characters)"


def number_words(value: int | float) -> str:
    """A number as a message shows it: a huge integer by its size (str() refuses more than 4,300 digits)."""
    if isinstance(value, int) and abs(value) >= 10**40:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    return str(value)


def type_problems(key: str, value: Any, tp: Any) -> list[tuple[str, str]]:
    """Why `value` cannot be the field `key` of type `tp`, in the user's words (never OmegaConf's)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        if value is None:
            return []
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    if value is None:
        return [] if tp is Any else [(key, f"must be {describe(tp)}, not null")]
    if typing.get_origin(tp) is dict:  # name each entry: data.columns.instruction
        if not isinstance(value, dict):
            return [(key, f"expected {describe(tp)}, got {shown(value)}")]
        return [(f"{key}.{name}", f"expected text, got {shown(v)}") for name, v in value.items()
                if not isinstance(name, str) or not fits(v, str)]
    if fits(value, tp):
        return []
    if tp is float and isinstance(value, int) and not isinstance(value, bool):  # past what a float holds
        return [(key, f"too large for a number: {shown(value)}")]
    return [(key, f"expected {describe(tp)}, got {shown(value)}")]
