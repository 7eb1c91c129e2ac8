"""Validation at the door: every bad row goes to rejects.parquet with its field and reason; counts reconcile."""

import json

import pytest

from safeconf.data.ingest import ingest
from safeconf.schema import DataFormatError

GOOD = {"id": "ok-1", "source": "t", "lang": "en", "task": "mcq", "category": "c", "question": "Which is safe?",
        "options": ["a", "b"], "answer": 1}

BAD_ROWS = [
    ({**GOOD, "id": ""}, "id", "missing or empty"),
    ({k: v for k, v in GOOD.items() if k != "question"}, "question", "missing or empty"),
    ({**GOOD, "question": "   "}, "question", "missing or empty"),
    ({**GOOD, "source": None}, "source", "missing or empty"),
    ({**GOOD, "answer": 2}, "answer", "out of range"),
    ({**GOOD, "answer": -1}, "answer", "out of range"),
    ({**GOOD, "answer": "B"}, "answer", "integer option index"),
    ({**GOOD, "options": ["only one"]}, "options", "at least 2 options"),
    ({**GOOD, "options": "a,b"}, "options", "must be a list"),
    ({**GOOD, "options": ["a", ""]}, "options", "options[1] is missing or empty"),
    ({**GOOD, "id": "ok-1"}, "id", "duplicate id"),
    ({**GOOD, "lang": "fr"}, "lang", "unknown language"),
    ({**GOOD, "task": "essay"}, "task", "unknown task"),
    ({**GOOD, "question": "caf\ufffd"}, "question", "undecodable"),
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "wb") as f:
        for i, row in enumerate(rows):
            f.write((json.dumps({**row, "id": row.get("id", f"x{i}")}, ensure_ascii=False) + "\n").encode())
        for line in extra_lines:
            f.write(line + b"\n")


def test_every_bad_row_is_rejected_with_field_and_reason(tmp_path):
    rows = [GOOD] + [{**row, "id": row["id"] if row.get("id") is not None else None} if "id" in row else row
                     for row, _, _ in BAD_ROWS]
    path = tmp_path / "q.jsonl"
    write_jsonl(path, rows, extra_lines=[b'{"id": "broken", ', b'{"id": "latin1", "question": "caf\xe9"}'])
    accepted, rejects, read = ingest(str(path))
    assert accepted.column("id").to_pylist() == ["ok-1"]
    assert read == len(rows) + 2 == accepted.num_rows + rejects.num_rows  # nothing lost
    got = rejects.to_pylist()
    for (row, field, reason), reject in zip(BAD_ROWS, got):
        assert reject["field"] == field and reason in reject["reason"], reject
    json_error, utf8_error = got[-2:]
    assert json_error["location"] == f"{path}:{len(rows) + 1}" and json_error["field"] == "row"
    assert utf8_error["location"] == f"{path}:{len(rows) + 2}" and "UTF-8" in utf8_error["reason"]
    assert all(r["location"].startswith(str(path)) and r["raw"] for r in got)


def test_a_file_that_cannot_be_parsed_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a"},\n{"id": ', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.json.*line 2"):
        ingest(f"json:{path}")


def test_pipeline_cli_reports_unreadable_files_clearly(tmp_path, capsys):
    from safeconf.cli import main

    path = tmp_path / "broken.json"
    path.write_text("[{", encoding="utf-8")
    assert main(["pipeline", "--data", f"json:{path}", "--out", str(tmp_path / "out")]) == 1
    assert "broken.json" in capsys.readouterr().err
