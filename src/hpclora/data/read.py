"""Read raw rows from a local file or a hub dataset, remembering where each row came from.

Every row is returned with its location (line number for JSON Lines and CSV, row number otherwise), so
that later stages can name the file and row of any problem.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, UserError
from ..staging import is_offline


@dataclass
class RawRow:
    values: dict[str, Any]
    number: int  # 1-based line (jsonl, csv) or row (json, parquet, hub) number
    unit: str  # "line" or "row"


def read_rows(path: str, split: str = "train") -> list[RawRow]:
    """All rows of a local .jsonl/.json/.csv/.parquet file, or of a hub dataset split."""
    if os.path.exists(path):
        return _read_local(Path(path))
    return _read_hub(path, split)


def _read_local(path: Path) -> list[RawRow]:
    if path.is_dir():
        raise DataError(str(path), "is a directory; give a .jsonl, .json, .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(str(path), f"unsupported file type '{suffix}': use .jsonl, .json, .csv or .parquet")


def _read_jsonl(path: Path) -> list[RawRow]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(str(path), f"not valid JSON: {exc.msg} (column {exc.colno})", number) from None
            if not isinstance(value, dict):
                raise DataError(str(path), f"expected a JSON object per line, got {type(value).__name__}", number)
            rows.append(RawRow(value, number, "line"))
    return rows


def _read_json(path: Path) -> list[RawRow]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved with a .json suffix
            return _read_jsonl(path)
        raise DataError(str(path), f"not valid JSON: {exc.msg}", exc.lineno) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(str(path), "expected a list of rows (or an object holding exactly one list)")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(str(path), f"expected a list of rows, got {type(value).__name__}")
    rows = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(str(path), f"expected an object, got {type(item).__name__}", index, unit="row")
        rows.append(RawRow(item, index, "row"))
    return rows


def _read_csv(path: Path) -> list[RawRow]:
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            return rows
        for record in reader:
            # DictReader counts physical lines, so quoted multi-line cells keep the numbering right.
            if None in record:
                raise DataError(str(path), "more cells than header columns", reader.line_num)
            rows.append(RawRow(dict(record), reader.line_num, "line"))
    return rows


def _read_parquet(path: Path) -> list[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(str(path), f"cannot read parquet: {exc}") from None
    return [RawRow(r, i, "row") for i, r in enumerate(table.to_pylist(), start=1)]


def _read_hub(dataset_id: str, split: str) -> list[RawRow]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:
        hint = (
            "this node is offline and the dataset is not in the Hugging Face cache ($HF_HOME); "
            "run `hpclora stage CONFIG` on a node with internet first"
            if is_offline()
            else "check the dataset id and split, or give a local file"
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"data.path: cannot load dataset '{dataset_id}' (split '{split}'): {first}; {hint}") from None
    return [RawRow(r, i, "row") for i, r in enumerate(ds, start=1)]
