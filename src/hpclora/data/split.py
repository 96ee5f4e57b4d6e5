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


MAX_HELD_SHARE = 0.25  # more than this held out of a file is said: a count copied from another config, on a small file


def held_out_warning(n: int, val_size: float) -> str | None:
    """A warning where data.val_size holds out more than MAX_HELD_SHARE of `n` rows (a valid split), else None."""
    held = validation_rows(n, val_size)
    if not n or held / n <= MAX_HELD_SHARE:
        return None
    return (f"warning: data.val_size={val_size:g} holds out {held} of the {n} rows ({held / n:.0%}) for validation, and the "
            f"adapter trains on {n - held}: data.val_size=0.1 would hold out {validation_rows(n, 0.1)}")


def split_indices(n: int, val_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffled train and validation indices (validation_rows of them held out)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = validation_rows(n, val_size)
    return sorted(order[held:]), sorted(order[:held])


def weighted_positions(n: int, weight: float, seed: int) -> list[int]:
    """Which of a source's `n` training examples go into the mix, and how often (data.sources[].weight): each
    int(weight) times, and a seeded draw of round(the fraction x n) of them once more. The same on every resume."""
    whole, part = _weighted(n, weight)
    extra = sorted(random.Random(seed).sample(range(n), part)) if part else []
    return [i for i in range(n) for _ in range(whole)] + extra


def mix_split(rows: list[int], val_size: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """Each source's (training, validation) row indices: data.val_size is held out of all the sources' `rows`
    together, as from one file (split_indices), so that one source's rows alone are the single-file split."""
    train, val = split_indices(sum(rows), val_size, seed)
    starts = [sum(rows[:i]) for i in range(len(rows))]
    return [([t - start for t in train if start <= t < start + n], [v - start for v in val if start <= v < start + n])
            for start, n in zip(starts, rows)]


def weighted_count(n: int, weight: float) -> int:
    """len(weighted_positions(n, weight, seed)), for the planner."""
    whole, part = _weighted(n, weight)
    return whole * n + part


def _weighted(n: int, weight: float) -> tuple[int, int]:
    return int(weight), round((weight - int(weight)) * n)
