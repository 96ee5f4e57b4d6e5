"""How many optimizer steps a run takes: the one rule, which the job applies to the micro-batches it has made and
the planner to those it expects (from the login node's count of the data rows and the same validation split)."""

from __future__ import annotations

import math

from ..config import RunConfig, world_size
from ..data.sources import data_sources
from ..data.split import mix_split, weighted_count


def total_steps(micro_batches: int, cfg: RunConfig, world: int) -> int:
    """Optimizer steps for the run: train.max_steps if set, else epochs over the training set's micro-batches, of
    which each step takes grad_accum x world (ranks)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(micro_batches / cfg.train.grad_accum / world)
    return max(1, math.ceil(per_epoch * cfg.train.epochs))


def planned_steps(cfg: RunConfig) -> int | None:
    """total_steps for the rows of the run's local data files (counted once per file version by the login node's
    data check), split and weighted as the job does, one row per micro-batch slot; None where the rows are not
    known here (a hub dataset without data.max_rows)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    from .preflight import check_data

    sources = data_sources(cfg.data)
    checked = check_data(cfg)
    # A hub dataset is not read here: cut to max_rows, it has at most that many rows (an upper bound, as the plan's
    # full-length rows are).
    rows = checked["per_source"] if checked is not None else [source.data.max_rows for source in sources]
    if None in rows:
        return None
    splits = mix_split(rows, cfg.data.val_size, cfg.run.seed)
    train_rows = sum(weighted_count(len(train), source.weight) for source, (train, _) in zip(sources, splits))
    return total_steps(math.ceil(train_rows / cfg.train.micro_batch_size), cfg, world_size(cfg))
