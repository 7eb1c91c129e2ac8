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


def delete(uri: str) -> None:
    """Remove a file or folder (local or object store); nothing when it does not exist."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def publish_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder to a local path or object store URI, replacing what was there."""
    fs, path = filesystem(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def write_table(uri: str, table: pa.Table) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, path, filesystem=fs)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def iter_batches(uri: str, columns: list[str] | None = None, batch_size: int = 256):
    """The record batches of a Parquet folder (or file), one file after the other and without read-ahead, so the
    reader holds one batch: Arrow's dataset scanner reads several files ahead on its threads, which cost the
    driver ~150 MB per 20,000 questions of the confidence table (benchmarks/pipeline_scale.py --phases)."""
    import pyarrow.dataset as pads

    fs, path = filesystem(uri)
    for file in sorted(pads.dataset(path, filesystem=fs, format="parquet").files):
        with fs.open_input_file(file) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size, columns=columns, use_threads=False)


def local_path(uri: str, cache_dir: str | os.PathLike) -> str:
    """A local path for `uri`. Plain paths and file:// URIs are returned as paths; a file or folder on an object
    store (s3://, gs://) is copied once into `cache_dir` and that copy is returned.

    Loaders, transformers, peft and vLLM read local files, and every node of a cluster needs its own copy: this
    runs where the file is needed (on the engine actor for adapters, on the driver for data). The copy is keyed
    by the URI and the listing (names, sizes, modification times), so a rewritten object is fetched again, and
    it is renamed into place when complete, so concurrent callers on a node never see half a copy.
    """
    import hashlib
    import shutil

    from filelock import FileLock

    if "://" not in uri:
        return uri
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {uri}")
    listing = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    stamp = "|".join([uri] + sorted(f"{f.path}:{f.size}:{f.mtime_ns}" for f in listing))
    folder = os.path.join(os.fspath(cache_dir), hashlib.sha256(stamp.encode("utf-8")).hexdigest()[:16])
    target = os.path.join(folder, info.base_name)
    if os.path.exists(target):
        return target
    os.makedirs(folder, exist_ok=True)
    with FileLock(folder + ".lock"):
        if not os.path.exists(target):
            partial = target + ".partial"  # what an interrupted copy left is redone
            if os.path.isdir(partial):
                shutil.rmtree(partial)
            if info.type == pafs.FileType.Directory:
                os.makedirs(partial)
            pafs.copy_files(path, partial, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            os.rename(partial, target)
    return target
