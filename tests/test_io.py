"""Output directories: local paths through pyarrow filesystems."""

import pyarrow as pa

from safeconf import io


def test_json_and_tables_round_trip(tmp_path):
    out = io.join(str(tmp_path), "run")
    io.write_json(io.join(out, "summary.json"), {"rows": 3, "名": "值"})
    assert io.read_json(io.join(out, "summary.json")) == {"rows": 3, "名": "值"}
    table = pa.table({"a": [1, 2]})
    io.write_table(io.join(out, "t", "part.parquet"), table)
    assert io.read_table(io.join(out, "t", "part.parquet")).equals(table)
    assert io.exists(io.join(out, "summary.json")) and not io.exists(io.join(out, "missing"))


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert io.normalise_uri("runs/x") == str(tmp_path / "runs" / "x")
    assert io.normalise_uri("s3://bucket/runs") == "s3://bucket/runs"
