"""A run's finished adapter, checked before any model loads: what generate, eval, chat and merge read. A directory
that lost its weights, a weights file cut short (a full disk, a copy stopped halfway) or a config that is no PEFT
config is named with what is wrong, instead of a library's traceback minutes into loading the base model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ..errors import UserError

WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def checked_adapter(run: Path) -> Path:
    """`run`/adapter, when it holds a readable PEFT config and whole weights; else a UserError naming the file."""
    adapter = run / "adapter"
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"{run}: has no finished adapter yet (adapter/adapter_config.json is missing); is the run still going or did it fail?")
    try:
        settings = json.loads(config.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{config}: not a JSON adapter config ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("peft_type"), str):
        raise UserError(f"{config}: not a PEFT adapter config (no peft_type)")
    weights = next((adapter / name for name in WEIGHTS if (adapter / name).is_file()), None)
    if weights is None:
        raise UserError(f"{adapter}: holds no weights ({' or '.join(WEIGHTS)}): the run's last save did not complete")
    if weights.suffix == ".safetensors" and (problem := safetensors_problem(weights)):
        raise UserError(f"{weights}: {problem}; the run's newest checkpoint (checkpoints/) may still hold whole weights")
    return adapter


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is no whole safetensors file, or None. The format: an 8-byte little-endian header length, a JSON
    header giving each tensor's byte range, then the bytes; a file cut short ends before the last range does."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"not a safetensors file ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return "not a safetensors file, or cut short inside its header"
        try:
            header = json.loads(fh.read(length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "not a safetensors file (its header is no tensor index)"
    if 8 + length + end != size:
        return f"cut short: {size:,} bytes where its index needs {8 + length + end:,}"
    return None
