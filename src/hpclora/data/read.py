"""Read raw rows from a local file or a hub dataset, one at a time, remembering where each came from.

Every row carries its location (line number for JSON Lines and CSV, row number otherwise), so that later
stages can name the file and row of any problem. Rows are streamed: checking a large file on a login node
never holds it in memory. Text files are UTF-8, with or without a byte-order mark; a file in another
encoding is refused with the encoding it seems to be in and the `iconv` line that converts it.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, UserError
from ..catalog.hub import dataset_in_cache, hf_home, is_offline, local_data_path

# Python's codec names -> (what users call the encoding, iconv's name for it).
ENCODINGS = {
    "cp932": ("Shift_JIS (Windows CP932)", "CP932"), "shift_jis": ("Shift_JIS", "SHIFT_JIS"),
    "euc_jp": ("EUC-JP", "EUC-JP"), "euc_jis_2004": ("EUC-JP", "EUC-JP"), "euc_jisx0213": ("EUC-JP", "EUC-JP"),
    "iso2022_jp": ("ISO-2022-JP", "ISO-2022-JP"), "utf_16": ("UTF-16", "UTF-16"), "utf_32": ("UTF-32", "UTF-32"),
    "latin_1": ("Latin-1", "LATIN1"), "cp1252": ("Windows-1252", "CP1252"), "gb18030": ("GB18030", "GB18030"),
    "big5": ("Big5", "BIG5"), "euc_kr": ("EUC-KR", "EUC-KR"),
}


@dataclass
class RawRow:
    values: dict[str, Any]
    number: int  # 1-based line (jsonl, csv) or row (json, parquet, hub) number
    unit: str  # "line" or "row"


def read_rows(path: str, split: str = "train") -> Iterator[RawRow]:
    """The rows of a local .jsonl/.json/.csv/.parquet file, or of a hub dataset split, in order."""
    local = local_data_path(path)
    if local is not None:
        return _read_local(local)
    return _read_hub(path, split)


def _read_local(path: Path) -> Iterator[RawRow]:
    if path.is_dir():
        raise DataError(str(path), "is a directory; give a .jsonl, .json, .csv or .parquet file")
    if not path.is_file():
        raise DataError(str(path), "file not found")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(str(path), f"unsupported file type '{suffix}': use .jsonl, .json, .csv or .parquet")
    return readers[suffix](path)


def not_utf8(path: Path, data: bytes, error: UnicodeDecodeError, line: int) -> DataError:
    """The error for a text file that is not UTF-8: where, which encoding it seems to be, how to convert it."""
    import charset_normalizer

    best = charset_normalizer.from_bytes(data[:262144]).best()
    bad = f"byte {error.object[error.start]:#04x} is not UTF-8"
    target = path.with_name(f"{path.stem}.utf8{path.suffix}")
    if best is None or best.encoding in ("utf_8", "ascii"):
        return DataError(str(path), f"{bad}: save the file as UTF-8 (`iconv -f ENCODING -t UTF-8 {path} > {target}`)", line)
    name, iconv = ENCODINGS.get(best.encoding, (best.encoding, best.encoding.upper().replace("_", "-")))
    return DataError(str(path), f"{bad}: the file looks like {name}; convert it with `iconv -f {iconv} -t UTF-8 {path} > {target}` "
                                "and point data.path at the result", line)


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (a leading byte-order mark is dropped), decoded line by line."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                fh.seek(0)
                raise not_utf8(path, fh.read(262144), exc, number) from None


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    for number, line in _text_lines(path):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not rows
        value = _json_value(path, line, number)
        if not isinstance(value, dict):
            raise DataError(str(path), f"expected a JSON object per line, got {type(value).__name__}", number)
        yield RawRow(value, number, "line")


def _json_value(path: Path, text: str, line: int | None):
    """`text` parsed, or a DataError at `line` (of a JSON Lines file; None: the whole file, located by the parser)
    for what Python's JSON reader cannot hold as well as for what is no JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f" (column {exc.colno})" if line is not None else ""
        raise DataError(str(path), f"not valid JSON: {exc.msg}{where}", line or exc.lineno) from None
    except RecursionError:
        raise DataError(str(path), f"nested more than {sys.getrecursionlimit()} levels deep: no row of data is", line) from None
    except ValueError as exc:  # an integer of more digits than Python converts (4,300)
        raise DataError(str(path), f"cannot be read: {str(exc).split(';')[0]}; write such a number as text", line) from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(str(path), f"holds a lone UTF-16 surrogate ({exc.object[exc.start]!a}), half of a character that "
                                   "the tool which wrote the file split: fix or drop that text", line) from None
    return value


def _read_json(path: Path) -> Iterator[RawRow]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, data, exc, data[: exc.start].count(b"\n") + 1) from None
    try:
        value = _json_value(path, text, None)
    except DataError as exc:
        if "Extra data" in str(exc):  # JSON Lines saved with a .json suffix
            yield from _read_jsonl(path)
            return
        raise
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(str(path), "expected a list of rows (or an object holding exactly one list)")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(str(path), f"expected a list of rows, got {type(value).__name__}")
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(str(path), f"expected an object, got {type(item).__name__}", index, unit="row")
        yield RawRow(item, index, "row")


def _read_csv(path: Path) -> Iterator[RawRow]:
    lines = (text for _, text in _text_lines(path))
    reader = csv.DictReader(lines)
    try:
        for record in reader:
            # DictReader counts physical lines, so quoted multi-line cells keep the numbering right.
            if None in record:
                raise DataError(str(path), "more cells than header columns", reader.line_num)
            yield RawRow(dict(record), reader.line_num, "line")
    except csv.Error as exc:
        raise DataError(str(path), f"not valid CSV: {exc}", reader.line_num) from None


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield RawRow(record, number, "row")
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        where = f"after row {number}" if number else "at its start"
        raise DataError(str(path), f"cannot read parquet {where}: {exc}") from None


OFFLINE_HINT = "this node is offline and the dataset is not in the Hugging Face cache ($HF_HOME); run `hpclora stage CONFIG` on a node with internet first"


def _read_hub(dataset_id: str, split: str) -> Iterator[RawRow]:
    import datasets

    if is_offline() and not dataset_in_cache(hf_home(), dataset_id):  # say so at once: no retries against a hub out of reach
        raise UserError(f"data.path: cannot load dataset '{dataset_id}' (split '{split}'): not in the cache at {hf_home()}; {OFFLINE_HINT}")
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:
        hint = OFFLINE_HINT if is_offline() else "check the dataset id and split, or give a local file"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"data.path: cannot load dataset '{dataset_id}' (split '{split}'): {first}; {hint}") from None
    return (RawRow(r, i, "row") for i, r in enumerate(ds, start=1))
