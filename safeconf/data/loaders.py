"""Readers that turn a data SPEC into raw question records of the schema.

A SPEC is `format:path`, a bare path (format guessed from the extension), or the word `embedded`.
Readers do not validate (the pipeline runs `safeconf.schema.validate_record` on every record), but
they never drop a row silently: a row that cannot become a record is yielded with `record=None` and
an `error`, so the run goes on and the row shows up among the rejects.

Every reader is a generator `reader(path) -> Iterator[RawRecord]`; a file that cannot be read at all
raises `DataFormatError` naming the file (and the line, where the parser gives it).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

from safeconf.data.files import (
    SCHEMA_KEYS,
    RawRecord,
    existing,
    files_in,
    json_list,
    jsonl_bytes,
    raw_text,
    row_location,
    schema_record,
)
from safeconf.data.public_sets import (
    read_cmmlu,
    read_cold,
    read_diasafety,
    read_mmlu,
    read_safetybench,
    read_safetybench_dev,
    read_xstest,
    read_xstest_completions,
)
from safeconf.models import fetch  # an object-store data path is copied into the cache and read from there
from safeconf.schema import DataFormatError

# Columns a columnar source (Parquet, HF datasets) must have; category and answer may be absent (null).
REQUIRED_COLUMNS = ("id", "source", "lang", "task", "question", "options")
URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, file://


# ---------------------------------------------------------------------------------------------
# readers in the schema


def read_jsonl(path) -> Iterator[RawRecord]:
    path = existing(path)
    yield from jsonl_bytes(path.read_bytes(), str(path))


def read_json(path) -> Iterator[RawRecord]:
    path = Path(path)
    for n, item in enumerate(json_list(path), start=1):
        location = row_location(path, n)
        if not isinstance(item, dict):
            yield RawRecord(location, None, ("row", f"expected a JSON object, got {type(item).__name__}"), raw_text(item))
        else:
            yield RawRecord(location, schema_record(item), None, raw_text(item))


def read_texts(path, column: str) -> Iterator[RawRecord]:
    """Rows of a plain log to judge (`safeconf judge --text-column`): a .jsonl file or Parquet file(s), each row
    kept as {"id": ..., column: ...}; the column is checked by the caller, so a row without it is a reject there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep = lambda obj: {"id": obj.get("id"), column: obj.get(column)}  # noqa: E731
    path = existing(path)
    if path.suffix == ".jsonl":
        yield from jsonl_bytes(path.read_bytes(), str(path), keep)
        return
    for file in files_in(path, ".parquet"):
        try:
            parquet = pq.ParquetFile(file)
            names = parquet.schema_arrow.names
            if column not in names:
                raise DataFormatError(f"{file}: no column {column!r} (it has {', '.join(names)})")
            n = 0
            for batch in parquet.iter_batches(columns=[c for c in ("id", column) if c in names]):
                for row in batch.to_pylist():
                    n += 1
                    yield RawRecord(row_location(file, n), keep(row), None, raw_text(row))
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{file}: not a readable Parquet file: {exc}") from exc


def read_parquet(path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files_in(path, ".parquet"):
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{file}: not a readable Parquet file: {exc}") from exc
        missing = [name for name in REQUIRED_COLUMNS if name not in parquet.schema_arrow.names]
        if missing:
            raise DataFormatError(f"{file}: Parquet file lacks column(s) {', '.join(missing)}")
        columns = [name for name in SCHEMA_KEYS if name in parquet.schema_arrow.names]
        n = 0
        try:
            # batch by batch, so a big file is never held whole in memory
            for batch in parquet.iter_batches(columns=columns):
                for row in batch.to_pylist():
                    n += 1
                    yield RawRecord(row_location(file, n), schema_record(row), None, raw_text(row))
        except (pa.ArrowException, OSError) as exc:
            raise DataFormatError(f"{file}: corrupt Parquet data after row {n}: {exc}") from exc


def read_hf(path) -> Iterator[RawRecord]:
    """`NAME_OR_PATH[:SPLIT]`: a `save_to_disk` folder, or a dataset `datasets.load_dataset` knows."""
    import datasets  # heavy; only imported when used

    name, split = str(path), None
    if not Path(name).exists() and ":" in name:
        name, split = name.rsplit(":", 1)
    if Path(name).is_dir():
        try:
            data = datasets.load_from_disk(name)
        except (FileNotFoundError, ValueError) as exc:
            raise DataFormatError(f"{name}: not a dataset written by save_to_disk: {exc}") from exc
        if isinstance(data, datasets.DatasetDict):
            split = split or "train"
            if split not in data:
                raise ValueError(f"{name} has no split {split!r}; it has {', '.join(data)}")
            data = data[split]
    else:
        data = datasets.load_dataset(name, split=split or "train")
    missing = [column for column in REQUIRED_COLUMNS if column not in data.column_names]
    if missing:
        raise DataFormatError(f"{name}: dataset lacks column(s) {', '.join(missing)}")
    where = f"{name}:{split}" if split else name
    for n, row in enumerate(data, start=1):
        yield RawRecord(row_location(where, n), schema_record(row), None, raw_text(row))


# ---------------------------------------------------------------------------------------------
# every format a SPEC may name (the public sets' readers: safeconf.data.public_sets; see ../shared/data/README.md)

FORMATS: dict[str, Callable[[str], Iterator[RawRecord]]] = {
    "jsonl": read_jsonl,
    "parquet": read_parquet,
    "json": read_json,
    "safetybench": read_safetybench,
    "safetybench-dev": read_safetybench_dev,
    "xstest": read_xstest,
    "xstest-completions": read_xstest_completions,
    "diasafety": read_diasafety,
    "cold": read_cold,
    "hf": read_hf,
    "mmlu": read_mmlu,
    "cmmlu": read_cmmlu,
}

EXTENSIONS = {".jsonl": "jsonl", ".parquet": "parquet", ".json": "json"}
EMBEDDED = "embedded"


def _known() -> str:
    return f"known formats: {', '.join(FORMATS)} (or a bare .jsonl/.parquet/.json path, or '{EMBEDDED}')"


def _embedded() -> Iterator[RawRecord]:
    resource = resources.files("safeconf.data").joinpath("embedded").joinpath("questions.jsonl")
    if not resource.is_file():
        raise FileNotFoundError(f"the embedded sample is missing: {resource}")
    return jsonl_bytes(resource.read_bytes(), str(resource))


def split_spec(spec: str) -> tuple[str, str]:
    """(format or "" when the SPEC names none, path as written): nothing is fetched or checked."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in FORMATS and not URI.match(spec):  # a bare s3:// / gs:// URI has its format in its extension
        return prefix, rest
    return "", spec


def parse_spec(spec: str) -> tuple[str, str]:
    """(format, local path) of a SPEC; raises ValueError / FileNotFoundError with the known formats."""
    fmt, path = split_spec(spec)
    prefix, sep, _ = spec.partition(":")
    if fmt:
        path = path if fmt == "hf" else fetch(path)
    elif sep and not URI.match(spec) and len(prefix) > 1 and re.fullmatch(r"[A-Za-z][\w-]*", prefix) \
            and not Path(spec).exists():
        # a single letter is a Windows drive, not a format
        raise ValueError(f"unknown data format {prefix!r} in {spec!r}; {_known()}")
    else:
        path = fetch(spec)
        target = Path(path)
        if not target.exists():
            raise FileNotFoundError(f"no such file or directory: {path} ({_known()})")
        if target.is_dir() and any(target.glob("*.parquet")):
            fmt = "parquet"
        elif target.suffix in EXTENSIONS and target.is_file():
            fmt = EXTENSIONS[target.suffix]
        else:
            raise ValueError(f"cannot guess the format of {path}; write it as FORMAT:PATH; {_known()}")
    if not path:
        raise ValueError(f"no path in data spec {spec!r}")
    if fmt != "hf" and not Path(path).exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    return fmt, path


def read_questions(spec: str, limit: int | None = None) -> Iterator[RawRecord]:
    """The raw records of a SPEC, at most `limit` of them. Bad specs raise here, not on iteration."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if spec == EMBEDDED:
        records = _embedded()
    else:
        fmt, path = parse_spec(spec)
        records = FORMATS[fmt](path)
    return _take(records, limit)


def _take(records: Iterator[RawRecord], limit: int | None) -> Iterator[RawRecord]:
    try:
        yield from itertools.islice(records, limit)
    finally:
        close = getattr(records, "close", None)  # closes the reader's open file early
        if close:
            close()
