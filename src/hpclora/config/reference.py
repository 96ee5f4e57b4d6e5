"""The schema's own documentation, for people: `hpclora validate --explain`, and docs/configuration.md, which
`hpclora validate --explain markdown` writes (tests/test_config.py fails when the file and the schema differ)."""

from __future__ import annotations

import dataclasses

from .rules import _choice
from .schema import ENTRIES, REQUIRED, SECTIONS


def _default(f) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return "(required)" if default == REQUIRED else ("null" if default is None else repr(default))


def _bounds(meta) -> str:
    words = {"min": ">=", "max": "<=", "gt": ">", "lt": "<"}
    return ", ".join(f"{words[k]} {meta[k]}" for k in words if k in meta)


def _tables():
    """(name, doc, [(key, field)]) per section, and after its section each list of entries (data.sources[])."""
    for section, cls in SECTIONS.items():
        yield section, cls.__doc__.strip(), [(f"{section}.{f.name}", f) for f in dataclasses.fields(cls)]
        for key, entry in ENTRIES.items():
            if key.startswith(f"{section}."):
                yield f"{key}[]", entry.__doc__.strip(), [(f"{key}[].{f.name}", f) for f in dataclasses.fields(entry)]


def explain() -> str:
    """Every key with its type, default and documentation, for `hpclora validate --explain`."""
    lines = []
    for name, doc, fields in _tables():
        lines.append(f"{name}:  # {doc}")
        for key, f in fields:
            choices = f.metadata.get("choices")
            lines.append(f"  {key.rsplit('.', 1)[1]}: {_default(f)}")
            lines.append(f"      {f.metadata.get('help', '')}")
            if choices:
                lines.append("      one of: " + ", ".join(map(_choice, choices)))
    return "\n".join(lines)


def markdown() -> str:
    """docs/configuration.md: one table per section, every key with its default, allowed values and meaning."""
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = [
        "# Configuration reference",
        "",
        "Every key of a config, with its default, the values it takes and what it does. A config is YAML with these",
        "sections; `key=value` overrides on the command line (`lora.r=16`) win over the file, which wins over the",
        "defaults. `hpclora validate --explain` prints the same. This page is generated from the schema",
        "(`src/hpclora/config/schema.py`): `hpclora validate --explain markdown > docs/configuration.md`.",
    ]
    for name, doc, fields in _tables():
        lines += ["", f"## `{name}`", "", doc, "", "| key | default | values | meaning |", "|---|---|---|---|"]
        for key, f in fields:
            choices = f.metadata.get("choices")
            values = ", ".join(f"`{_choice(c)}`" for c in choices) if choices else _bounds(f.metadata)
            lines.append(f"| `{key}` | `{cell(_default(f))}` | {cell(values)} | {cell(f.metadata.get('help', ''))} |")
    return "\n".join(lines) + "\n"
