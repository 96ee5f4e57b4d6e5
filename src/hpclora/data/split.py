"""The validation split, decided here only: how many rows are held out, and which. The planner counts steps with
the same numbers the job trains with."""

from __future__ import annotations

import random

from ..errors import ConfigError


def validation_rows(n: int, val_size: float) -> int:
    """Rows held out of `n`: `val_size` rows when it is a count (>= 1), else that fraction of them, rounded, and at
    least one where any is asked for and there are two rows or more. Refuses a split that leaves no training row."""
    held = int(val_size) if val_size >= 1 else round(n * val_size)
    if val_size > 0 and held == 0 and n >= 2:
        held = 1
    if held >= n:
        raise ConfigError([("data.val_size", f"{val_size:g} leaves none of the {n} rows (after data.max_rows) to "
                                             f"train on: use a fraction such as 0.1, or a count below {n}")])
    return held


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffled train and validation indices (validation_rows of them held out)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = validation_rows(n, val_size)
    return sorted(order[held:]), sorted(order[:held])
