"""How many optimizer steps a run takes: the one rule, which the job applies to the micro-batches it has made and
the planner to those it expects (from the login node's count of the data rows and the same validation split)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from ..catalog.tokenizer_files import file_tokenizer
from ..config import RunConfig, world_size
from ..data.sources import data_sources
from ..data.split import mix_split, weighted_count, weighted_positions


def total_steps(micro_batches: int, cfg: RunConfig, world: int) -> int:
    """Optimizer steps for the run: train.max_steps if set, else epochs over the training set's micro-batches, of
    which each step takes grad_accum x world (ranks)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_epoch = math.ceil(micro_batches / cfg.train.grad_accum / world)
    return max(1, math.ceil(per_epoch * cfg.train.epochs))


def planned_steps(cfg: RunConfig, packed: bool) -> tuple[int | None, str]:
    """total_steps for the run's data as the job will see it, and how it was counted; None where the rows are not
    known here (a hub dataset without data.max_rows). Local data files are counted as the job counts them: split and
    weighted alike, and, where the model's tokenizer files are on this node, tokenized, cut and (`packed`:
    data.packing as resolved) packed by the job's own functions; else one row per example, which packing only lowers."""
    if cfg.train.max_steps:
        return cfg.train.max_steps, "train.max_steps"
    from .preflight import check_data

    sources = data_sources(cfg.data)
    checked = check_data(cfg)
    if checked is None:  # a hub dataset is not read here: cut to max_rows, it has at most that many rows
        rows = [source.data.max_rows for source in sources]
        if None in rows:
            return None, "rows not known here"
        note = "at most: hub datasets cut to data.max_rows"
    else:
        rows = checked["per_source"]
        tokenizer = file_tokenizer(cfg) if cfg.method.name == "sft" else None  # a preference run's pairs are never dropped
        if tokenizer is not None:
            micro_batches = math.ceil(counted_rows(cfg, tokenizer, packed) / cfg.train.micro_batch_size)
            what = "packed rows" if packed else "examples"
            return total_steps(micro_batches, cfg, world_size(cfg)), f"{what} counted with the model's tokenizer"
        note = ("at most: one row per example, as the model's tokenizer is not on this node to count packed rows"
                if packed else "one row per example" if cfg.method.name == "sft" else "one micro-batch row per pair")
        if cfg.method.name == "kto" and checked["format"] == "preference":
            note = "two micro-batch rows per pair (kto trains on each answer apart)"
    splits = mix_split(rows, cfg.data.val_size, cfg.run.seed)
    train_rows = sum(weighted_count(len(train), source.weight) for source, (train, _) in zip(sources, splits))
    if checked is not None and cfg.method.name == "kto" and checked["format"] == "preference":
        train_rows *= 2
    return total_steps(math.ceil(train_rows / cfg.train.micro_batch_size), cfg, world_size(cfg)), note


_counted: dict[str, int] = {}  # data files' versions and settings -> counted_rows


def counted_rows(cfg: RunConfig, tokenizer, packed: bool) -> int:
    """The training rows data.prepare makes of the run's local data files: each source's training split rendered,
    tokenized and cut as the job does (rows left with nothing to train dropped), weighted, then packed."""
    from ..data import load_sources, render
    from ..data.packing import pack_rows
    from ..data.tokenize import encode_many, trained_example

    versions = [(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in map(Path, [s.data.path for s in data_sources(cfg.data)])]
    key = json.dumps([asdict(cfg.data), cfg.run.seed, packed, versions, tokenizer.fingerprint], sort_keys=True, default=str)
    if key not in _counted:
        loaded = load_sources(cfg.data)
        splits = mix_split([len(rows.conversations) for rows in loaded], cfg.data.val_size, cfg.run.seed)
        lengths = []
        for i, (rows, (train, _)) in enumerate(zip(loaded, splits)):
            d = rows.source.data
            pieces = [render(d.template, rows.conversations[j], tokenizer) for j in train]
            kept = [len(cut[0]) for ids, labels in encode_many(pieces, tokenizer, d.template, d.train_on_prompt)
                    if (cut := trained_example(ids, labels, d.max_length)) is not None]
            lengths += [kept[j] for j in weighted_positions(len(kept), rows.source.weight, cfg.run.seed + i)]
        _counted[key] = len(pack_rows(lengths, cfg.data.max_length)) if packed else len(lengths)
    return _counted[key]
