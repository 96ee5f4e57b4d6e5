"""Data for a run: read -> normalise -> split -> template + tokenize (cached) -> pack.

`prepare(cfg.data, tokenizer, seed, packed)` returns the train and validation sets ready for the Trainer, and
the numbers the job log prints about them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DataError, UserError
from .normalize import check_columns, detect_format, normalize, rename_columns
from .packing import Collator, length_grouped, pack
from .read import read_rows
from .split import split_indices, validation_rows
from .templates import render
from .tokenize import cache_key, encode, rendered_pieces, tokenize_dataset, tokenizer_fingerprint

__all__ = ["prepare", "PreparedData", "Collator", "batched_by_length", "render", "encode", "check_rows", "load_conversations", "split_indices", "tokenized", "validation_rows"]


@dataclass
class PreparedData:
    train: object  # datasets.Dataset
    val: object | None
    format: str
    stats: dict = field(default_factory=dict)


def conversations(data_cfg) -> Iterator[tuple[list[dict], int, str]]:
    """Each row as a normalised message list, with its source row number and the data format, one at a time.
    A bad row stops the iteration with a DataError naming its file and line."""
    rows = read_rows(data_cfg.path, data_cfg.split)
    if data_cfg.max_rows:
        rows = itertools.islice(rows, data_cfg.max_rows)
    columns, fmt = dict(data_cfg.columns), None
    for row in rows:
        if fmt is None:  # the first row shows the file's columns
            check_columns(row, columns, data_cfg.path)
        rename_columns(row, columns)
        if fmt is None:  # ... and, renamed, its format
            fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(row, data_cfg.path)
            if fmt == "text" and data_cfg.template != "none":
                raise UserError(f"data.template: plain-text data has no prompt to template: use data.template=none (got {data_cfg.template!r})")
        yield normalize(row, fmt, data_cfg.path), row.number, fmt
    if fmt is None:
        raise DataError(data_cfg.path, "the dataset has no rows")


def load_conversations(data_cfg) -> tuple[list[list[dict]], list[int], str]:
    """Every row as a normalised message list, with its source row number and the detected format."""
    messages, numbers, fmt = [], [], ""
    for conversation, number, fmt in conversations(data_cfg):
        messages.append(conversation)
        numbers.append(number)
    return messages, numbers, fmt


def check_rows(data_cfg) -> dict:
    """Read and normalise every row as training will, keeping none of them: the login node's check that the
    data will not fail in the job. Returns the row count and format."""
    count, fmt = 0, ""
    for _, _, fmt in conversations(data_cfg):
        count += 1
    return {"rows": count, "format": fmt}




def default_cache_dir() -> Path:
    from ..catalog.state import cache_root

    return cache_root() / "tokenized"


def tokenized(data_cfg, conversations: list[list[dict]], numbers: list[int], tokenizer, split: str):
    """(dataset, whether it came from the cache) for these conversations, tokenized as training does.
    Cached in data.cache_dir by content: `hpclora eval` on a run's validation rows reuses training's."""
    cache_dir = Path(data_cfg.cache_dir) if data_cfg.cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    rendered = rendered_pieces(data_cfg.template, conversations, tokenizer)
    key = cache_key(rendered, tokenizer_fingerprint(tokenizer), data_cfg.template, data_cfg.max_length, data_cfg.train_on_prompt)
    cache_file = cache_dir / f"{key}-{split}.arrow"
    cached = cache_file.exists()
    ds = tokenize_dataset(rendered, numbers, tokenizer, data_cfg.template, data_cfg.max_length, data_cfg.train_on_prompt, str(cache_file))
    return ds, cached


def prepare(data_cfg, tokenizer, seed: int, packed: bool = False) -> PreparedData:
    """`packed`: data.packing as resolved for the model (models.packing_choice)."""
    conversations, numbers, fmt = load_conversations(data_cfg)
    if data_cfg.template == "chat":
        try:
            render("chat", conversations[0], tokenizer)
        except ValueError as exc:
            raise UserError(f"data.template: {exc}") from None
    train_idx, val_idx = split_indices(len(conversations), data_cfg.val_size, seed)
    stats = {"rows": len(conversations), "format": fmt, "template": data_cfg.template}
    sets = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        if not idx:
            sets[split] = None
            continue
        ds, stats[f"{split}_cached"] = tokenized(data_cfg, [conversations[i] for i in idx], [numbers[i] for i in idx], tokenizer, split)
        stats[f"{split}_rows"] = len(idx)
        stats[f"{split}_examples"] = len(ds)
        stats[f"{split}_dropped"] = len(idx) - len(ds)
        if len(ds) == 0:  # every example dropped: the map's result has no columns at all
            if split == "train":
                raise DataError(data_cfg.path, f"no training example is left: every response of the {len(idx)} training rows lies "
                                               f"beyond data.max_length={data_cfg.max_length} tokens; raise data.max_length, or "
                                               "shorten the prompts")
            stats.update({f"{split}_truncated": 0, f"{split}_tokens": 0})
            sets[split] = None
            continue
        stats[f"{split}_truncated"] = int(sum(ds["truncated"]))
        stats[f"{split}_tokens"] = int(sum(len(ids) for ids in ds["input_ids"]))
        sets[split] = ds
    if sets["train"] is None:
        raise DataError(data_cfg.path, "no training rows: data.val_size takes every row")
    if packed:
        for split in ("train", "val"):
            if sets[split] is not None and len(sets[split]):
                sets[split] = _packed(sets[split], data_cfg.max_length)
                stats[f"{split}_packed_rows"] = len(sets[split])
    return PreparedData(sets["train"], sets["val"], fmt, stats)


def _packed(ds, max_length: int):
    import datasets

    return datasets.Dataset.from_dict(pack(list(zip(ds["input_ids"], ds["labels"])), max_length))


def batched_by_length(ds, rows_per_batch: int, seed: int):
    """The unpacked training rows as a dataset of micro-batches, each of rows of similar length (less padding);
    the Trainer shuffles these batches every epoch as it would shuffle rows."""
    import datasets

    batches = length_grouped(list(map(len, ds["input_ids"])), rows_per_batch, seed)
    ids, labels = ds["input_ids"], ds["labels"]
    return datasets.Dataset.from_dict({"input_ids": [[ids[i] for i in b] for b in batches], "labels": [[labels[i] for i in b] for b in batches]})
