"""Sweep grids: `--grid key=v1,v2` options -> the cartesian product of trials, as override lists."""

from __future__ import annotations

import itertools
import math

from ..errors import ConfigError

# One job array shares one set of resources and one place on disk, so these cannot vary per trial.
FIXED_PER_ARRAY = ("slurm.", "container.", "run.output_root")


def split_values(text: str) -> list[str]:
    """`8,16` -> [8, 16]; commas inside [...], {...} or quotes do not split: `[q_proj,v_proj],[q_proj]`."""
    values, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += ch
    values.append(current)
    return [v.strip() for v in values]


MAX_TRIALS = 1000  # array tasks 0..999: within Slurm's default MaxArraySize (1001)


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`--grid` options as (key, values); every problem is reported at once, with the option's key."""
    grid, problems, seen = [], [], set()
    for spec in specs:
        key, eq, text = spec.partition("=")
        key = key.strip()
        values = split_values(text) if eq else []
        if not key or not eq or not all(values):
            problems.append((spec, "a grid option must look like section.key=value1,value2"))
        elif key.startswith(FIXED_PER_ARRAY):
            problems.append((key, "cannot vary within one sweep (one job array shares its resources and output root)"))
        elif key in seen:
            problems.append((key, "given twice in --grid"))
        elif len(set(values)) < len(values):
            twice = sorted({v for v in values if values.count(v) > 1})
            problems.append((key, f"{', '.join(twice)} given twice: each trial would run twice; give each value once"))
        else:
            seen.add(key)
            grid.append((key, values))
    count = math.prod(len(values) for _, values in grid)
    if not problems and count > MAX_TRIALS:  # said before a single trial's config is read
        sizes = " x ".join(str(len(values)) for _, values in grid)
        problems.append(("--grid", f"{sizes} = {count:,} trials; one job array holds at most {MAX_TRIALS:,} (Slurm's default "
                                   "MaxArraySize is 1001): fewer values, or several sweeps"))
    if problems:
        raise ConfigError(problems)
    return grid


def trials(grid: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Each trial's overrides, in a stable order: the last grid key varies fastest."""
    keys = [key for key, _ in grid]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(values for _, values in grid))]
