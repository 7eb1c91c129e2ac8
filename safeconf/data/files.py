"""Raw records and the file-reading helpers every reader shares (safeconf.data.loaders for the schema's own formats,
safeconf.data.public_sets for the public safety sets): a row that cannot become a record is kept with its location
and reason, and a file that cannot be read raises DataFormatError naming it."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from safeconf.schema import QUESTION_SCHEMA, DataFormatError

RAW_LIMIT = 2000  # characters of a row kept in RawRecord.raw
SCHEMA_KEYS = tuple(QUESTION_SCHEMA.names)


@dataclass
class RawRecord:
    location: str  # "<path>:<line>" (1-based) for JSONL/CSV, "<path>:row <n>" (1-based) otherwise
    record: dict | None  # keys of the question schema; None when the row could not be parsed
    error: tuple[str, str] | None = None  # (field, reason) when the row could not become a record
    raw: str = ""  # the row as read, truncated to RAW_LIMIT characters


def raw_text(value) -> str:
    """The row as text for RawRecord.raw: strings as they are, anything else JSON-encoded."""
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return value[:RAW_LIMIT]


def line_location(path, line: int) -> str:
    return f"{path}:{line}"


def row_location(path, row: int) -> str:
    return f"{path}:row {row}"


def existing(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    return path


def files_in(path, suffix: str) -> list[Path]:
    """A single file, or the sorted files with `suffix` in a directory (not recursive)."""
    path = existing(path)
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == suffix)
    if not files:
        raise FileNotFoundError(f"no {suffix} files in directory {path}")
    return files


def schema_record(obj: dict) -> dict:
    """Only the schema's keys; a missing key becomes None so validation names it."""
    return {key: obj.get(key) for key in SCHEMA_KEYS}


def blank(value) -> bool:
    return value is None or not str(value).strip()


def load_json(path: Path):
    """The whole JSON document of a file; a file that does not parse raises DataFormatError."""
    path = existing(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{path}: not valid UTF-8 at byte {exc.start}: {exc.reason}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


def json_list(path: Path) -> list:
    data = load_json(path)
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON array of objects, got a JSON {type(data).__name__}")
    return data


CsvRow = tuple[str, dict | list | None, str, tuple[str, str] | None]  # location, row, raw, error


def csv_rows(path: Path, header: bool = True, required: tuple[str, ...] = ()) -> Iterator[CsvRow]:
    """Yield (location, row, raw, error) for each CSV row; location is the row's first line.

    With `header`, rows are dicts keyed by the header (which must hold `required`), otherwise lists.
    A row whose column count differs from the header's comes with a ("row", ...) error. Decoding
    replaces bad bytes (U+FFFD) so one bad row does not kill the file: validation rejects it later.
    utf-8-sig drops the BOM that COLD's files start with.
    """
    path = existing(path)
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
        reader = csv.reader(handle)
        try:
            columns = None
            if header:
                columns = next(reader, None)
                if columns is None:
                    raise DataFormatError(f"{path}: empty CSV file, expected a header row")
                missing = [name for name in required if name not in columns]
                if missing:
                    raise DataFormatError(
                        f"{path}:1: CSV header lacks column(s) {', '.join(missing)} (found {columns})"
                    )
            end = reader.line_num
            for fields in reader:
                start, end = end + 1, reader.line_num  # a quoted field may span several lines
                if not fields:  # blank line
                    continue
                location = line_location(path, start)
                if columns is None:
                    yield location, fields, raw_text(fields), None
                elif len(fields) != len(columns):
                    error = ("row", f"expected {len(columns)} columns, got {len(fields)}")
                    yield location, None, raw_text(fields), error
                else:
                    row = dict(zip(columns, fields))
                    yield location, row, raw_text(row), None
        except csv.Error as exc:
            raise DataFormatError(f"{path}:{reader.line_num}: unreadable CSV: {exc}") from exc


def jsonl_bytes(data: bytes, name: str, keep: Callable[[dict], dict] = schema_record) -> Iterator[RawRecord]:
    # Decode line by line so that one bad line (invalid UTF-8 or JSON) does not kill the file.
    for number, line in enumerate(data.split(b"\n"), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        line = line.rstrip(b"\r")  # CRLF files
        location = line_location(name, number)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"not valid UTF-8 at byte {exc.start}: {exc.reason}"
            yield RawRecord(location, None, ("row", reason), raw_text(line.decode("utf-8", "replace")))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRecord(location, None, ("row", f"invalid JSON: {exc}"), raw_text(text))
            continue
        if not isinstance(obj, dict):
            yield RawRecord(location, None, ("row", f"expected a JSON object, got {type(obj).__name__}"), raw_text(text))
            continue
        yield RawRecord(location, keep(obj), None, raw_text(text))
