"""Run directories, data, models and adapters on an object store: a local S3 (moto) on loopback."""

import json
import time

import pyarrow.fs as pafs
import pytest

from safeconf import io
from safeconf.data.loaders import read_questions

QUESTION = {"id": "q1", "source": "t", "lang": "en", "task": "mcq", "category": "c",
            "question": "Which is safe?", "options": ["A knife to a child", "A spoon to a child"], "answer": 1}


def put(uri: str, data: bytes) -> None:
    fs, path = io.filesystem(uri)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def test_a_folder_is_copied_once_and_again_when_it_changes(local_s3, tmp_path):
    put(f"{local_s3}/adapter/adapter_config.json", b'{"r": 8}')
    put(f"{local_s3}/adapter/weights/a.bin", b"1234")
    cache = tmp_path / "cache"

    first = io.local_path(f"{local_s3}/adapter", cache)
    assert first.startswith(str(cache)) and first.endswith("/adapter")
    assert json.loads(open(f"{first}/adapter_config.json").read()) == {"r": 8}
    assert open(f"{first}/weights/a.bin", "rb").read() == b"1234"
    assert io.local_path(f"{local_s3}/adapter", cache) == first  # unchanged: the copy is reused

    time.sleep(1.1)  # S3 modification times have one-second resolution
    put(f"{local_s3}/adapter/adapter_config.json", b'{"r": 16}')  # a rerun wrote a new adapter
    second = io.local_path(f"{local_s3}/adapter", cache)
    assert second != first and json.loads(open(f"{second}/adapter_config.json").read()) == {"r": 16}
    assert not list(cache.rglob("*.partial"))


def test_local_paths_pass_through_and_a_missing_object_is_named(local_s3, tmp_path):
    assert io.local_path("/some/local/path", tmp_path) == "/some/local/path"
    assert io.local_path(f"file://{tmp_path}/x", tmp_path) == f"{tmp_path}/x"
    with pytest.raises(FileNotFoundError, match=f"{local_s3}/nothing-here"):
        io.local_path(f"{local_s3}/nothing-here", tmp_path)


@pytest.mark.parametrize("spec", ["jsonl:{root}/data/q.jsonl", "{root}/data/q.jsonl"])
def test_a_data_spec_can_name_an_object(local_s3, spec, tmp_path, monkeypatch):
    monkeypatch.setenv("SAFECONF_CACHE", str(tmp_path))
    put(f"{local_s3}/data/q.jsonl", (json.dumps(QUESTION) + "\n").encode())
    records = list(read_questions(spec.format(root=local_s3)))
    assert [r.record["id"] for r in records] == ["q1"] and records[0].error is None


def test_run_directory_helpers_write_and_read_objects(local_s3):
    io.write_json(f"{local_s3}/run/stages/pipeline.json", {"ok": True})
    assert io.exists(f"{local_s3}/run/stages/pipeline.json")
    assert io.read_json(f"{local_s3}/run/stages/pipeline.json") == {"ok": True}
    fs, path = io.filesystem(f"{local_s3}/run")
    assert isinstance(fs, pafs.S3FileSystem)
