"""Output directories on a local disk or object store (s3://, gs://) through pyarrow filesystems."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def normalise_uri(uri: str) -> str:
    """Absolute local paths for plain paths; URIs with a scheme pass through."""
    return uri if "://" in uri else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([normalise_uri(uri).rstrip("/"), *parts])


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(normalise_uri(uri))


def make_dirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def write_json(uri: str, obj) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode("utf-8"))


def read_json(uri: str):
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read().decode("utf-8"))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_table(uri: str, table: pa.Table) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)
