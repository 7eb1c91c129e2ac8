"""Questions streamed through Ray Data (safeconf.data.stream), as the pipeline reads them: validated on the workers,
rejects written from there with their location, field and reason, duplicate ids found without the driver holding
every id (the first valid copy in read order kept, as the driver-side ingest keeps it), counts reconciled."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import REPO

from safeconf.data.stream import count_values, question_stream, raw_rows, read_tasks, repeated_ids
from safeconf.data.ingest import ingest

EMBEDDED = REPO / "safeconf" / "data" / "embedded" / "questions.jsonl"


def _question(n: int) -> dict:
    return json.loads(EMBEDDED.read_text(encoding="utf-8").splitlines()[n])


@pytest.fixture
def folder(tmp_path):
    """Three files: b repeats an id of a (and repeats one of its own); c's first copy of an id is invalid, so its
    later valid copy is no duplicate and is kept; c also has an unreadable line."""
    folder = tmp_path / "questions"
    folder.mkdir()
    a = [_question(i) for i in range(4)]
    b = [_question(10), {**_question(11), "id": a[1]["id"]}, _question(12), {**_question(13), "id": _question(12)["id"]}]
    invalid_first = {**_question(20), "answer": 7}
    c = [invalid_first, {**_question(21), "id": invalid_first["id"]}]
    for name, rows in (("a", a), ("b", b), ("c", c)):
        lines = [json.dumps(r, ensure_ascii=False) for r in rows] + (["{broken"] if name == "c" else [])
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_streamed_questions_match_the_driver_side_ingest_row_for_row(local_ray, folder, tmp_path):
    spec = f"jsonl:{folder}/*.jsonl"
    rejects_uri = str(tmp_path / "rejects")
    streamed = sorted(question_stream(spec, rejects_uri).take_all(), key=lambda r: r["position"])
    # the driver-side ingest of the same files, in the same order, is the reference
    combined = tmp_path / "combined.jsonl"
    combined.write_bytes(b"".join(p.read_bytes() for p in sorted(folder.glob("*.jsonl"))))
    questions, rejects, read = ingest(f"jsonl:{combined}")
    assert [r["id"] for r in streamed] == questions.column("id").to_pylist()
    assert [r["location"].rsplit("/", 1)[-1] for r in streamed][:2] == ["a.jsonl:1", "a.jsonl:2"]
    got_rejects = pq.read_table(rejects_uri).to_pylist()
    assert sorted((r["field"], r["reason"]) for r in got_rejects) == sorted(
        zip(rejects.column("field").to_pylist(), rejects.column("reason").to_pylist()))
    # where each reject was: file and line
    where = sorted((r["location"].rsplit("/", 1)[-1], r["field"]) for r in got_rejects)
    assert where == [("b.jsonl:2", "id"), ("b.jsonl:4", "id"), ("c.jsonl:1", "answer"), ("c.jsonl:3", "row")]
    # rows read = accepted + rejected
    assert len(streamed) + sum(count_values(rejects_uri, ["field"])["field"].values()) == read == 11


def test_only_the_repeated_ids_reach_the_driver(local_ray, folder):
    repeated = repeated_ids(raw_rows(read_tasks(f"jsonl:{folder}")), partitions=2)
    assert repeated == {_question(1)["id"]: 1,  # a.jsonl (read task 0), its second row
                        _question(12)["id"]: (1 << 32) | 2}  # b.jsonl (task 1), its third row


def test_limit_takes_the_first_rows_in_read_order(local_ray, folder, tmp_path):
    rows = question_stream(f"jsonl:{folder}", str(tmp_path / "rejects"), limit=6).take_all()
    # rows read: a.jsonl 1-4 and b.jsonl 1-2, of which b.jsonl:2 repeats an id of a
    assert sorted(r["location"].rsplit("/", 1)[-1] for r in rows) == [
        "a.jsonl:1", "a.jsonl:2", "a.jsonl:3", "a.jsonl:4", "b.jsonl:1"]
    assert count_values(str(tmp_path / "rejects"), ["field"])["field"] == {"id": 1}


def test_questions_come_in_engine_batch_sized_blocks(local_ray, tmp_path):
    """One file's rows are not one block: engine actors take a block at a time, so a 40-question file in one
    block would go to a single actor however many there are."""
    rows = question_stream("embedded", str(tmp_path / "rejects"), limit=40, batch_size=4).materialize()
    assert rows.count() == 40 and rows.num_blocks() == 10


def test_a_path_that_does_not_exist_fails_on_the_driver(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        question_stream(f"jsonl:{tmp_path}/missing/*.jsonl", str(tmp_path / "rejects"))
