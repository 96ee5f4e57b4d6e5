"""Read raw rows from a local file or a hub dataset, one at a time, remembering where each came from.

Every row carries its location (line number for JSON Lines and CSV, row number otherwise), so that later
stages can name the file and row of any problem. Rows are streamed: checking a large file on a login node
never holds it in memory. Text files are UTF-8, with or without a byte-order mark; a file in another
encoding is refused with the encoding it seems to be in and the `iconv` line that converts it.
"""

from __future__ import annotations

import csv
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, UserError
from ..catalog.hub import LOCAL_DATA_SUFFIXES, dataset_in_cache, hf_home, is_offline, local_data_path

# Python's codec names -> (what users call the encoding, iconv's name for it).
ENCODINGS = {
    "cp932": ("Shift_JIS (Windows CP932)", "CP932"), "shift_jis": ("Shift_JIS", "SHIFT_JIS"),
    "euc_jp": ("EUC-JP", "EUC-JP"), "euc_jis_2004": ("EUC-JP", "EUC-JP"), "euc_jisx0213": ("EUC-JP", "EUC-JP"),
    "iso2022_jp": ("ISO-2022-JP (JIS)", "ISO-2022-JP"), "utf_16": ("UTF-16", "UTF-16"), "utf_32": ("UTF-32", "UTF-32"),
    "utf_16_le": ("UTF-16 little-endian without a byte-order mark", "UTF-16LE"),
    "utf_16_be": ("UTF-16 big-endian without a byte-order mark", "UTF-16BE"),
    "utf_32_le": ("UTF-32 little-endian", "UTF-32LE"), "utf_32_be": ("UTF-32 big-endian", "UTF-32BE"),
    "latin_1": ("Latin-1 (ISO-8859-1)", "LATIN1"), "cp1252": ("Windows-1252 (Western European, Latin-1's superset)", "CP1252"),
    "cp1250": ("Windows-1250 (Central European)", "CP1250"), "cp1257": ("Windows-1257 (Baltic)", "CP1257"), "gb18030": ("GB18030", "GB18030"),
    "big5": ("Big5", "BIG5"), "euc_kr": ("EUC-KR", "EUC-KR"),
}
# Where the detector finds several encodings that read the bytes equally well (a French text is as plausible in
# cp1250 as in cp1252: only the accented letters differ), the one most files in the wild are written in.
MOST_USED = ("utf_16_le", "utf_16_be", "utf_16", "cp932", "euc_jp", "iso2022_jp", "cp1252", "latin_1")
# Bytes UTF-8 allows that a text data file in UTF-8 never holds: NUL (UTF-16 and UTF-32 are full of them) and ESC
# (ISO-2022-JP switches character sets with ESC sequences, in otherwise 7-bit bytes).
FOREIGN_BYTES = (b"\x00", b"\x1b")
SAMPLE_BYTES = 262144  # what the encoding detector reads


@dataclass
class RawRow:
    values: dict[str, Any]
    number: int  # 1-based line (jsonl, csv) or row (json, parquet, hub) number
    unit: str  # "line" or "row"


def read_rows(path: str, split: str = "train") -> Iterator[RawRow]:
    """The rows of a local .jsonl/.json/.csv/.parquet/.txt file, or of a hub dataset split, in order."""
    local = local_data_path(path)
    if local is not None:
        return _read_local(local)
    return _read_hub(path, split)


def _read_local(path: Path) -> Iterator[RawRow]:
    readable = ", ".join(LOCAL_DATA_SUFFIXES)
    if path.is_dir():
        raise DataError(str(path), f"is a directory; give one data file ({readable})")
    if not path.is_file():
        raise DataError(str(path), "file not found")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
               ".txt": _read_txt}
    if suffix not in readers:
        raise DataError(str(path), f"unsupported file type '{suffix}': use {readable}")
    return readers[suffix](path)


def _read_txt(path: Path) -> Iterator[RawRow]:
    """Plain text, one example per non-empty line (data.format text, template none)."""
    for number, line in _text_lines(path):
        if line.strip():
            yield RawRow({"text": line.rstrip("\r\n")}, number, "line")


def not_utf8(path: Path, data: bytes, line: int, bad: str) -> DataError:
    """The error for a text file that is not UTF-8: where (`bad`: which byte), the encoding it seems to be in, how
    the line reads in it (so that the user can tell a wrong guess), and how to convert it."""
    import charset_normalizer

    target = path.with_name(f"{path.stem}.utf8{path.suffix}")
    matches = list(charset_normalizer.from_bytes(data))
    if not matches or matches[0].encoding in ("utf_8", "ascii"):
        return DataError(str(path), f"{bad}: save the file as UTF-8 (`iconv -f ENCODING -t UTF-8 {path} > {target}`)", line)
    tied = [m.encoding for m in matches if (m.chaos, m.coherence) == (matches[0].chaos, matches[0].coherence)]
    best = min(tied, key=lambda e: MOST_USED.index(e) if e in MOST_USED else len(MOST_USED))
    name, iconv = ENCODINGS.get(best, (best, best.upper().replace("_", "-")))
    reads = _line_in(data, best, line)
    others = [ENCODINGS.get(e, (e,))[0] for e in tied if e != best]
    doubt = f"; if its accents come out wrong, it may be {others[0]}" if others else ""
    return DataError(str(path), f"{bad}: the file looks like {name} (line {line} then reads '{reads}'){doubt}; convert it with "
                                f"`iconv -f {iconv} -t UTF-8 {path} > {target}` and point data.path at the result", line)


def _line_in(data: bytes, encoding: str, line: int, width: int = 60) -> str:
    """Line `line` of `data` decoded as `encoding`, from a little before its first letter beyond ASCII."""
    lines = data.decode(encoding, errors="replace").splitlines() or [""]
    text = lines[min(line, len(lines)) - 1].strip()
    beyond = next((i for i, c in enumerate(text) if ord(c) > 127), 0)
    shown = "".join(c if c.isprintable() else "?" for c in text[max(0, beyond - 20):][:width])
    return ("…" if beyond > 20 else "") + shown + ("…" if len(text) > max(0, beyond - 20) + width else "")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file (a leading byte-order mark is dropped), decoded line by line."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                bad = f"byte {exc.object[exc.start]:#04x} is not UTF-8"
            else:
                if not any(b in raw for b in FOREIGN_BYTES):
                    yield number, text
                    continue
                bad = "its bytes are not UTF-8 text (NUL or ESC bytes)"
            fh.seek(0)
            raise not_utf8(path, fh.read(SAMPLE_BYTES), number, bad) from None


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
    collecting = gc.isenabled()
    gc.disable()  # a collection that ran finalizers at the parser's depth would fail there too, unraisably
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f" (column {exc.colno})" if line is not None else ""
        raise DataError(str(path), f"not valid JSON: {exc.msg}{where}", line or exc.lineno) from None
    except RecursionError:
        raise DataError(str(path), f"nested more than {sys.getrecursionlimit()} levels deep: no row of data is", line) from None
    except ValueError as exc:  # an integer of more digits than Python converts (4,300)
        raise DataError(str(path), f"cannot be read: {str(exc).split(';')[0]}; write such a number as text", line) from None
    finally:
        if collecting:
            gc.enable()
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
        bad = f"byte {data[exc.start]:#04x} is not UTF-8"
        raise not_utf8(path, data[:SAMPLE_BYTES], data[: exc.start].count(b"\n") + 1, bad) from None
    if found := [data.index(b) for b in FOREIGN_BYTES if b in data]:
        bad = "its bytes are not UTF-8 text (NUL or ESC bytes)"
        raise not_utf8(path, data[:SAMPLE_BYTES], data[: min(found)].count(b"\n") + 1, bad)
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
    # strict: a quote never closed is an error, not a cell that swallows the rest of the file
    reader = csv.DictReader(lines, strict=True)
    start = 1  # the line the record being read starts on
    try:
        if reader.fieldnames is not None:
            start = reader.line_num + 1
        for record in reader:
            # DictReader counts physical lines, so quoted multi-line cells keep the numbering right.
            if None in record:
                raise DataError(str(path), "more cells than header columns", reader.line_num)
            yield RawRow(dict(record), reader.line_num, "line")
            start = reader.line_num + 1
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise DataError(str(path), 'not valid CSV: a quote opened in this record is never closed (a cell holding a " '
                                       'is written in quotes with the " doubled: "say ""hi""")', start) from None
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
