"""A run's data as a list of sources: data.path alone, or the mix that data.sources lists, each entry read with
the data section's settings where it sets none of its own. The config's checks, the login node's data check and
plan, the job, eval and the container's binds all go through here, so that a mix is read everywhere alike."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Source:
    data: Any  # the config's DataSection as this source reads it: its own path, split, format, template, ...
    weight: float  # how often each of its training rows is in the mix (data/split.py: weighted_positions)
    key: str  # where it is configured, for messages: `data` or `data.sources[1]`


def data_sources(data) -> list[Source]:
    if not data.sources:
        return [Source(data, 1.0, "data")]
    sources = []
    for i, entry in enumerate(data.sources):
        own = {name: value for name, value in entry.items() if name != "weight" and value is not None}
        sources.append(Source(replace(data, **own, sources=[]), float(entry.get("weight", 1.0)), f"data.sources[{i}]"))
    return sources
