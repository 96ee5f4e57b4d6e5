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
from . import preference
from .normalize import check_columns, check_format, detect_format, normalize, rename_columns
from .packing import Collator, length_grouped, pack
from .read import read_rows
from .sources import Source, data_sources
from .split import mix_split, split_indices, validation_rows, weighted_positions
from .templates import render
from .tokenize import cache_key, encode, rendered_pieces, tokenize_dataset, tokenizer_fingerprint

__all__ = ["prepare", "PreparedData", "SourceRows", "Collator", "batched_by_length", "render", "encode", "check_rows", "load_conversations",
           "load_sources", "split_indices", "tokenized", "validation_rows", "validation_sources"]


@dataclass
class PreparedData:
    train: object  # datasets.Dataset
    val: object | None
    format: str
    stats: dict = field(default_factory=dict)


@dataclass
class SourceRows:
    """One source's rows, read and normalised: the conversations, their row numbers in the file, its format."""

    source: Source
    conversations: list[list[dict]]
    numbers: list[int]
    format: str


def conversations(data_cfg, key: str = "data", method: str = "sft") -> Iterator[tuple[list[dict] | dict, int, str]]:
    """Each row of one data file as a normalised message list (a prompt with its answers for preference methods), with
    its source row number and the data format, one at a time. A bad row stops the iteration with a DataError naming its
    file and line. `key`: where the file is configured (data, or data.sources[1]), for messages about its settings;
    `method`: method.name, which decides the formats the rows may have."""
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
            check_format(row, fmt, data_cfg.path, key)
            if problem := preference.format_problem(method, fmt):
                raise DataError(data_cfg.path, problem, row.number, row.unit)
            if fmt == "text" and data_cfg.template != "none":
                raise UserError(f"{key}.template: plain-text data has no prompt to template: use {key}.template=none (got {data_cfg.template!r})")
        yield normalize(row, fmt, data_cfg.path), row.number, fmt
    if fmt is None:
        raise DataError(data_cfg.path, "the dataset has no rows")


def load_conversations(data_cfg, key: str = "data", method: str = "sft") -> tuple[list, list[int], str]:
    """Every row of one data file normalised (conversations), with its source row number and the detected format."""
    messages, numbers, fmt = [], [], ""
    for conversation, number, fmt in conversations(data_cfg, key, method):
        messages.append(conversation)
        numbers.append(number)
    return messages, numbers, fmt


def load_sources(data_cfg, method: str = "sft") -> list[SourceRows]:
    """Every source of the run (data.path, or each of data.sources) read and normalised."""
    return [SourceRows(source, *load_conversations(source.data, source.key, method)) for source in data_sources(data_cfg)]


def check_rows(data_cfg, key: str = "data", method: str = "sft") -> dict:
    """Read and normalise every row of one data file as training will, keeping none of them: the login node's check
    that the data will not fail in the job. Returns the row count and format."""
    count, fmt = 0, ""
    for _, _, fmt in conversations(data_cfg, key, method):
        count += 1
    return {"rows": count, "format": fmt}


def validation_sources(data_cfg, seed: int, method: str = "sft") -> list[SourceRows]:
    """The run's validation rows, each source's apart (they are tokenized with its template): the split training made."""
    loaded = load_sources(data_cfg, method)
    splits = mix_split([len(rows.conversations) for rows in loaded], data_cfg.val_size, seed)
    return [SourceRows(rows.source, [rows.conversations[i] for i in val], [rows.numbers[i] for i in val], rows.format)
            for rows, (_, val) in zip(loaded, splits)]


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


def prepare(data_cfg, tokenizer, seed: int, packed: bool = False, method: str = "sft") -> PreparedData:
    """`packed`: data.packing as resolved for the model (models.packing_choice). Of a mix, each source is tokenized
    with its own settings and weighted (weighted_positions); the mixed training examples are shuffled with `seed`
    before packing, so that packed rows hold examples of every source. `method` (method.name): preference methods get
    tokenized pairs (or, for kto, labelled answers) instead of examples."""
    loaded = load_sources(data_cfg, method)
    for rows in loaded:
        if rows.source.data.template == "chat":
            first = rows.conversations[0]
            try:
                render("chat", first["prompt"] if isinstance(first, dict) else first, tokenizer)
            except ValueError as exc:
                raise UserError(f"{rows.source.key}.template: {exc}") from None
    splits = mix_split([len(rows.conversations) for rows in loaded], data_cfg.val_size, seed)
    formats, templates = {rows.format for rows in loaded}, {rows.source.data.template for rows in loaded}
    stats = {"rows": sum(len(rows.conversations) for rows in loaded), "format": formats.pop() if len(formats) == 1 else "mixed",
             "template": templates.pop() if len(templates) == 1 else "mixed"}
    parts: dict[str, list] = {"train": [], "val": []}
    source_formats = [rows.format for rows in loaded]
    for i, (rows, indices) in enumerate(zip(loaded, splits)):
        examples = 0
        for split, idx in zip(("train", "val"), indices):
            if not idx:
                continue
            chosen, numbers = [rows.conversations[j] for j in idx], [rows.numbers[j] for j in idx]
            if method == "sft":
                ds, cached = tokenized(rows.source.data, chosen, numbers, tokenizer, split)
            else:  # a few thousand pairs tokenize in seconds: not cached
                ds, cached = preference.dataset(rows.source.data, chosen, numbers, tokenizer,
                                                preference.split_into_answers(method, split, source_formats)), False
            dropped = len(idx) - len(ds) if method == "sft" else 0  # a pair's prompt that fills max_length is an error, not a drop
            if split == "train" and rows.source.weight != 1 and len(ds):
                ds = ds.select(weighted_positions(len(ds), rows.source.weight, seed + i)).flatten_indices()
            examples += len(ds) if split == "train" else 0
            parts[split].append((ds, len(idx), dropped, cached))
        if len(loaded) > 1:
            stats.setdefault("sources", []).append({"path": rows.source.data.path, "rows": len(rows.conversations), "format": rows.format,
                                                    "template": rows.source.data.template, "weight": rows.source.weight,
                                                    "train_examples": examples})
    sets = {split: _joined(split, parts[split], stats) for split in ("train", "val")}
    if sets["train"] is None:
        if stats.get("train_rows"):  # every example dropped
            raise DataError(loaded[0].source.data.path if len(loaded) == 1 else "data.sources",
                            f"no training example is left: every response of the {stats['train_rows']} training rows lies "
                            f"beyond data.max_length={data_cfg.max_length} tokens; raise data.max_length, or shorten the prompts")
        raise DataError(data_cfg.path or "data.sources", "no training rows: data.val_size takes every row")
    if len(loaded) > 1:
        sets["train"] = sets["train"].shuffle(seed=seed).flatten_indices()
    if packed:
        for split in ("train", "val"):
            if sets[split] is not None and len(sets[split]):
                sets[split] = _packed(sets[split], data_cfg.max_length)
                stats[f"{split}_packed_rows"] = len(sets[split])
    return PreparedData(sets["train"], sets["val"], stats["format"], stats)


def _joined(split: str, parts: list, stats: dict):
    """One split's datasets of every source as one (None where no example is left), its numbers added to `stats`."""
    import datasets

    if not parts:
        return None
    stats[f"{split}_rows"] = sum(rows for _, rows, _, _ in parts)
    stats[f"{split}_cached"] = all(cached for *_, cached in parts)
    stats[f"{split}_dropped"] = sum(dropped for _, _, dropped, _ in parts)
    kept = [ds for ds, *_ in parts if len(ds)]  # a dataset of no example has no columns at all
    stats[f"{split}_examples"] = sum(len(ds) for ds in kept)
    stats[f"{split}_truncated"] = sum(int(sum(ds["truncated"])) for ds in kept)
    stats[f"{split}_tokens"] = sum(int(sum(len(ids) for ids in ds[column])) for ds in kept for column in ds.column_names if column.endswith("_ids"))
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else datasets.concatenate_datasets(kept)


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
