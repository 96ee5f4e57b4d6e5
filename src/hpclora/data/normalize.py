"""Turn raw rows of any supported format into one shape: a list of messages.

A message is {"role": "system"|"user"|"assistant", "content": str, "input": str}; `input` carries the
alpaca "input" field of a user turn ("" otherwise), so templates that show it separately can. Plain-text
rows become a single message with role "text". Preference rows become a prompt (messages) with its answers
(preference.py).
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from . import preference
from .read import RawRow

FORMATS = ("alpaca", "sharegpt", "messages", "text", *preference.FORMATS)

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
    "system": "system",
}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def detect_format(row: RawRow, path: str) -> str:
    keys = set(row.values)
    if "chosen" in keys or "rejected" in keys:
        return preference.PAIRED
    if "completion" in keys and "label" in keys:
        return preference.UNPAIRED
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    raise DataError(
        path,
        f"cannot tell the data format from the columns {sorted(keys)}: expected instruction/output (alpaca), "
        "conversations (sharegpt), messages, text, prompt/chosen/rejected (preference) or prompt/completion/label (unpaired); "
        "set data.format, or map columns with data.columns",
        row.number,
        row.unit,
    )


# The column that marks each format (as detect_format reads it).
FORMAT_COLUMNS = {"sharegpt": "conversations", "messages": "messages", "alpaca": "instruction", "text": "text",
                  preference.PAIRED: "chosen", preference.UNPAIRED: "completion"}


def check_format(row: RawRow, fmt: str, path: str, key: str = "data") -> None:
    """The first row against a data.format that was set: rows of another format (a copied config's `alpaca` on
    ShareGPT data) are named as what they look like, with the fix, instead of a field the format misses."""
    if FORMAT_COLUMNS[fmt] in row.values:
        return
    try:
        seen = detect_format(row, path)
    except DataError:
        return  # nothing recognisable: normalize names the missing field
    raise DataError(path, f"the rows look like {seen} data ({FORMAT_COLUMNS[seen]}), but {key}.format is {fmt}: "
                          f"set {key}.format=auto (detects it) or {key}.format={seen}", row.number, row.unit)


def check_columns(row: RawRow, columns: dict[str, str], path: str) -> None:
    """`data.columns` ({wanted_name: name_in_file}) must name columns the file has (as its first row shows)."""
    absent = {wanted: present for wanted, present in columns.items() if present not in row.values}
    if absent:
        named = ", ".join(f"{wanted}: {present}" for wanted, present in absent.items())
        raise DataError(path, f"data.columns names columns the file does not have ({named}); its columns are {sorted(row.values)}",
                        row.number, row.unit)


def rename_columns(row: RawRow, columns: dict[str, str]) -> None:
    """Apply `data.columns` ({wanted_name: name_in_file}) to one row, in place."""
    for wanted, present in columns.items():
        if present in row.values:
            row.values[wanted] = row.values.pop(present)


def normalize(row: RawRow, fmt: str, path: str) -> list[dict[str, str]] | dict:
    """A conversation (a message list), or for preference formats a dict of a prompt and its answers."""
    def fail(message: str):
        raise DataError(path, message, row.number, row.unit)

    values = row.values
    if not any(_has_text(v) or isinstance(v, list) and v for v in values.values()):
        fail("empty row")
    if fmt == preference.PAIRED:
        return preference.normalize_pair(values, fail)
    if fmt == preference.UNPAIRED:
        return preference.normalize_unpaired(values, fail)
    if fmt == "alpaca":
        instruction = _text_field(values, "instruction", fail)
        output = _text_field(values, "output", fail)
        extra = values.get("input") or ""
        if not isinstance(extra, str):
            fail(f"field 'input' must be text, got {type(extra).__name__}")
        return [_msg("user", instruction, extra.strip()), _msg("assistant", output)]
    if fmt == "text":
        return [_msg("text", _text_field(values, "text", fail))]
    if fmt == "sharegpt":
        return _turns(values, "conversations", "from", "value", SHAREGPT_ROLES, fail)
    if fmt == "messages":
        return _turns(values, "messages", "role", "content", MESSAGE_ROLES, fail)
    raise ValueError(f"unknown format {fmt}")


def _msg(role: str, content: str, extra: str = "") -> dict[str, str]:
    return {"role": role, "content": content, "input": extra}


def _has_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _text_field(values: dict, name: str, fail) -> str:
    if name not in values or values[name] is None:
        fail(f"missing field '{name}'")
    value = values[name]
    if not isinstance(value, str):
        fail(f"field '{name}' must be text, got {type(value).__name__}")
    if not value.strip():
        fail(f"field '{name}' is empty")
    return value


def _turns(values: dict, list_key: str, role_key: str, text_key: str, roles: dict, fail) -> list[dict[str, str]]:
    turns = values.get(list_key)
    if not isinstance(turns, list) or not turns:
        fail(f"missing or empty '{list_key}' list")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            fail(f"turn {i} of '{list_key}' needs '{role_key}' and '{text_key}'")
        role = roles.get(str(turn[role_key]).lower())
        if role is None:
            fail(f"turn {i}: unknown role {turn[role_key]!r} (expected one of {sorted(roles)})")
        text = _text_field(turn, text_key, lambda message, i=i: fail(f"turn {i} of '{list_key}': {message}"))
        messages.append(_msg(role, text))
    # A conversation cut so that it opens with the assistant has no prompt for those turns.
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
    if not any(m["role"] == "assistant" for m in messages):
        fail(f"'{list_key}' has no assistant turn after a user turn: nothing to train on")
    return messages
