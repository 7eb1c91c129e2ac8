"""Tests of safeconf.data.loaders: every format on the real shared data, and the edge cases on tmp files.

The public data sets live beside the repository (../shared/data, or $SAFECONF_SHARED_DATA); tests that
need them skip when the folder is absent (a fresh clone has none). Row counts and gold labels are
recomputed here independently with json / csv, not through the loader.
"""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA as SHARED, shared_data

from safeconf.data.judge import judge_options, judge_question
from safeconf.data.loaders import FORMATS, RawRecord, read_questions
from safeconf.schema import QUESTION_SCHEMA, DataFormatError, validate_record

FFFD = "\ufffd"


def shared(relative: str) -> Path:
    return shared_data(*relative.split("/"))


@functools.lru_cache(maxsize=None)
def load(spec: str) -> list[RawRecord]:
    """Read a spec once per session (the COLD and DiaSafety train files are big)."""
    return list(read_questions(spec))


def validate_all(records: list[RawRecord]) -> tuple[list[dict], dict[int, tuple[str, str]], dict[int, tuple[str, str]]]:
    """(clean rows, loader errors by record index, validation rejects by record index)."""
    seen_ids: set[str] = set()
    clean, errors, rejects = [], {}, {}
    for i, raw in enumerate(records):
        assert isinstance(raw, RawRecord)
        assert len(raw.raw) <= 2000
        if raw.error is not None:
            assert raw.record is None
            errors[i] = raw.error
            continue
        assert set(raw.record) == set(QUESTION_SCHEMA.names)
        row, reject = validate_record(raw.record, seen_ids)
        if reject:
            rejects[i] = reject
        else:
            clean.append(row)
    return clean, errors, rejects


def csv_dicts(path: Path) -> list[dict]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return list(csv.DictReader(handle))


def csv_lists(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return [row for row in csv.reader(handle) if row]


# ---------------------------------------------------------------------------------------------
# real data sets


def test_safetybench_answers_from_answers_file():
    path = shared("safetybench/test_zh_subset.json")
    items = json.loads(path.read_text(encoding="utf-8"))
    gold = json.loads((path.parent / "test_answers_zh_subset.json").read_text(encoding="utf-8"))
    records = load(f"safetybench:{path}")
    assert len(records) == len(items)
    clean, errors, rejects = validate_all(records)
    assert errors == {} and rejects == {}
    for item, raw in zip(items, records):
        record = raw.record
        assert record["id"] == f"safetybench-zh-{item['id']}"
        # a Yes / No judgement whose ask says which answer is unsafe is a judgement; the rest multiple choice
        task = "mcq" if record["unsafe_option"] is None else "judge"
        assert (record["lang"], record["task"], record["source"]) == ("zh", task, "safetybench")
        assert record["options"] == item["options"] and record["category"] == item["category"]
        assert record["answer"] == gold[str(item["id"])]["answer"]
    assert records[0].location == f"{path}:row 1"


def test_safetybench_without_answers_file_gives_null_answers(tmp_path):
    items = [{"id": 7, "question": "Q?", "options": ["a", "b"], "category": "X"},
             {"id": 8, "question": "Q2?", "options": ["a", "b"], "category": "X", "answer": 1}]
    path = tmp_path / "test_en.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    records = list(read_questions(f"safetybench:{path}"))
    assert [r.record["answer"] for r in records] == [None, 1]
    assert [r.record["id"] for r in records] == ["safetybench-en-7", "safetybench-en-8"]
    assert validate_all(records)[1:] == ({}, {})


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_safetybench_dev(lang):
    path = shared(f"safetybench/dev_{lang}.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    expected = [(category, i, item) for category, items in data.items() for i, item in enumerate(items)]
    records = load(f"safetybench-dev:{path}")
    assert len(records) == len(expected) == 35
    clean, errors, rejects = validate_all(records)
    assert errors == {} and rejects == {}
    for (category, i, item), raw in zip(expected, records):
        assert raw.record["id"] == f"safetybench-dev-{lang}-{category}-{i}"
        assert raw.record["lang"] == lang and raw.record["category"] == category
        assert raw.record["answer"] == item["answer"] and raw.record["options"] == item["options"]


def test_xstest_prompts():
    path = shared("xstest/xstest_prompts.csv")
    rows = csv_dicts(path)
    records = load(f"xstest:{path}")
    assert len(records) == len(rows) == 450
    clean, errors, rejects = validate_all(records)
    assert errors == {} and rejects == {}
    for row, raw in zip(rows, records):
        record = raw.record
        assert record["id"] == f"xstest-{row['id']}"
        assert record["answer"] == {"safe": 0, "unsafe": 1}[row["label"]]
        assert record["question"] == judge_question("en", "request", row["prompt"])
        assert record["options"] == judge_options("en")
        assert (record["category"], record["task"], record["lang"]) == (row["type"], "judge", "en")
    unsafe = [raw.record for row, raw in zip(rows, records) if row["label"] == "unsafe"]
    assert len(unsafe) == 200 and all(r["answer"] == 1 for r in unsafe)
    assert records[0].location == f"{path}:2"  # line 1 is the header


def completion_files() -> list[Path]:
    folder = SHARED / "xstest" / "model_completions"
    return sorted(folder.glob("xstest_v2_completions_*.csv")) if folder.is_dir() else []


@pytest.mark.skipif(not completion_files(), reason=f"no XSTest completions under {SHARED} (set SAFECONF_SHARED_DATA)")
@pytest.mark.parametrize("path", completion_files(), ids=lambda p: p.stem)
def test_xstest_completions(path):
    model = path.stem.removeprefix("xstest_v2_completions_")
    rows = csv_dicts(path)
    records = load(f"xstest-completions:{path}")
    assert len(records) == len(rows) == 450
    clean, errors, rejects = validate_all(records)
    assert errors == {} and rejects == {}
    mapping = {"1_full_compliance": 0, "2_full_refusal": 1, "3_partial_refusal": 2}
    for row, raw in zip(rows, records):
        record = raw.record
        assert record["source"] == f"xstest-completions-{model}"
        assert record["id"] == f"xstest-completions-{model}-{row['id']}"
        assert record["answer"] == mapping[row["final_label"]]
        assert record["options"] == ["Full compliance", "Full refusal", "Partial refusal"]
        assert row["prompt"] in record["question"] and row["completion"] in record["question"]
        assert (record["category"], record["task"], record["lang"]) == (row["type"], "judge", "en")


@pytest.mark.parametrize("split", ["val", "train"])
def test_diasafety(split):
    path = shared(f"diasafety/{split}.json")
    items = json.loads(path.read_text(encoding="utf-8"))
    records = load(f"diasafety:{path}")
    assert len(records) == len(items)
    clean, errors, rejects = validate_all(records)
    # Upstream quirks: a few empty responses (loader error) and mis-decoded text that already holds
    # U+FFFD in the file (validation rejects it).
    empty = {i for i, item in enumerate(items) if not item["response"].strip()}
    garbled = {i for i, item in enumerate(items) if i not in empty and FFFD in item["response"] + item["context"]}
    assert errors == {i: ("response", "response is empty") for i in empty}
    assert set(rejects) == garbled and all(field == "question" for field, _ in rejects.values())
    assert len(clean) == len(items) - len(empty) - len(garbled)
    for i in range(0, len(items), 97):  # a sample
        if i in empty:
            continue
        item, record = items[i], records[i].record
        assert record["id"] == f"diasafety-{split}-{i}"
        assert record["answer"] == {"Safe": 0, "Unsafe": 1}[item["label"]]
        assert record["question"] == judge_question("en", "response", item["response"], context=item["context"])
        assert record["category"] == item["category"] and records[i].location == f"{path}:row {i + 1}"


@pytest.mark.parametrize("split", ["dev", "train"])
def test_cold(split):
    path = shared(f"cold/{split}.csv")
    rows = csv_lists(path)
    assert rows[0] == ["", "split", "topic", "label", "TEXT"]
    rows = rows[1:]
    records = load(f"cold:{path}")
    assert len(records) == len(rows)
    clean, errors, rejects = validate_all(records)
    assert errors == {}
    # Some texts were cut mid-character upstream and end in U+FFFD: validation rejects them.
    assert set(rejects) == {i for i, row in enumerate(rows) if FFFD in row[4]}
    assert len({row[0] for row in rows}) < len(rows)  # the index column repeats: ids must not use it
    for i in range(0, len(rows), 211):
        row, record = rows[i], records[i].record
        assert record["id"] == f"cold-{split}-{i}"
        assert record["answer"] == int(row[3]) and record["category"] == row[2]
        assert record["question"] == judge_question("zh", "text", row[4])
        assert record["options"] == judge_options("zh") and record["lang"] == "zh"
    assert records[0].location == f"{path}:2"


@pytest.mark.parametrize("split", ["test", "dev"])
def test_mmlu(split):
    folder = shared(f"general/mmlu/{split}")
    files = sorted(folder.glob("*.csv"))
    expected = [(f, i, row) for f in files for i, row in enumerate(csv_lists(f))]
    records = load(f"mmlu:{folder}")
    assert len(records) == len(expected) == {"test": 1465, "dev": 40}[split]
    clean, errors, rejects = validate_all(records)  # ids are unique though one row repeats upstream
    assert errors == {} and rejects == {}
    for (file, i, row), raw in zip(expected, records):
        subject = file.stem.removesuffix(f"_{split}")
        record = raw.record
        assert record["id"] == f"mmlu-{split}-{subject}-{i}" and record["category"] == subject
        assert record["question"] == row[0] and record["options"] == row[1:5]
        assert record["answer"] == "ABCD".index(row[5])
        assert (record["lang"], record["task"], record["source"]) == ("en", "mcq", "mmlu")


def test_mmlu_locations_follow_quoted_line_breaks():
    path = shared("general/mmlu/test/nutrition_test.csv")  # CRLF, quoted fields with line breaks
    records = load(f"mmlu:{path}")
    lines = path.read_bytes().split(b"\n")
    for raw in records:
        line = int(raw.location.rsplit(":", 1)[1])
        first = lines[line - 1].decode("utf-8").lstrip('"')
        assert raw.record["question"].startswith(first.split(",")[0].rstrip("\r")[:30])


@pytest.mark.parametrize("split", ["test", "dev"])
def test_cmmlu(split):
    folder = shared(f"general/cmmlu/{split}")
    files = sorted(folder.glob("*.csv"))
    expected = [(f, i, row) for f in files for i, row in enumerate(csv_dicts(f))]
    records = load(f"cmmlu:{folder}")
    assert len(records) == len(expected) == {"test": 1328, "dev": 40}[split]
    clean, errors, rejects = validate_all(records)
    assert errors == {} and rejects == {}
    for (file, i, row), raw in zip(expected, records):
        record = raw.record
        assert record["id"] == f"cmmlu-{split}-{file.stem}-{i}" and record["category"] == file.stem
        assert record["question"] == row["Question"] and record["options"] == [row[c] for c in "ABCD"]
        assert record["answer"] == "ABCD".index(row["Answer"])
        assert (record["lang"], record["task"], record["source"]) == ("zh", "mcq", "cmmlu")


def test_ids_unique_across_all_shared_sets():
    shared("")
    specs = [f"safetybench:{SHARED}/safetybench/test_zh_subset.json",
             f"safetybench-dev:{SHARED}/safetybench/dev_en.json",
             f"safetybench-dev:{SHARED}/safetybench/dev_zh.json",
             f"xstest:{SHARED}/xstest/xstest_prompts.csv",
             f"diasafety:{SHARED}/diasafety/val.json", f"cold:{SHARED}/cold/dev.csv",
             f"mmlu:{SHARED}/general/mmlu/test", f"mmlu:{SHARED}/general/mmlu/dev",
             f"cmmlu:{SHARED}/general/cmmlu/test", f"cmmlu:{SHARED}/general/cmmlu/dev"]
    specs += [f"xstest-completions:{p}" for p in completion_files()]
    ids = [r.record["id"] for spec in specs for r in load(spec) if r.record]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# formats in the schema, on tmp files


def question(i: int, **changes) -> dict:
    row = {"id": f"q{i}", "source": "test", "lang": "en", "task": "mcq", "category": "c",
           "question": f"Question {i}?", "options": ["yes", "no"], "answer": i % 2, "unsafe_option": None}
    row.update(changes)
    return row


def test_jsonl_bad_lines_become_errors(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [
        json.dumps(question(1)).encode(),
        b'{"id": "q2", "question": ',  # truncated JSON
        b"",  # blank: skipped
        '{"id": "q3", "question": "caf\u00e9"}'.encode("latin-1"),  # not UTF-8
        json.dumps(question(4), ensure_ascii=False).encode() + b"\r",  # CRLF line
        b"[1, 2]",  # not an object
        json.dumps(question(6)).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    records = list(read_questions(str(path)))  # format guessed from .jsonl
    assert [r.location for r in records] == [f"{path}:{n}" for n in (1, 2, 4, 5, 6, 7)]
    by_line = {int(r.location.rsplit(":", 1)[1]): r for r in records}
    assert by_line[2].record is None and by_line[2].error[0] == "row" and "invalid JSON" in by_line[2].error[1]
    assert by_line[4].record is None and by_line[4].error[0] == "row" and "UTF-8" in by_line[4].error[1]
    assert by_line[6].error == ("row", "expected a JSON object, got list")
    assert by_line[2].raw == lines[1].decode()
    assert [by_line[n].record["id"] for n in (1, 5, 7)] == ["q1", "q4", "q6"]
    clean, errors, rejects = validate_all(records)
    assert len(clean) == 3 and rejects == {}


def test_jsonl_missing_keys_are_left_to_validation(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "Q?", "extra": 1}) + "\n", encoding="utf-8")
    (raw,) = read_questions(f"jsonl:{path}")
    assert set(raw.record) == set(QUESTION_SCHEMA.names) and raw.record["lang"] is None
    assert validate_record(raw.record, set())[1][0] == "source"


def test_raw_is_truncated(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(question(1, question="x" * 5000)) + "\n", encoding="utf-8")
    (raw,) = read_questions(str(path))
    assert len(raw.raw) == 2000 and raw.record["question"] == "x" * 5000


def test_json_list(tmp_path):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([question(1), "oops", question(3)]), encoding="utf-8")
    records = list(read_questions(str(path)))
    assert [r.location for r in records] == [f"{path}:row {n}" for n in (1, 2, 3)]
    assert records[1].error == ("row", "expected a JSON object, got str")
    assert validate_all(records)[0] == [validate_record(question(1), set())[0], validate_record(question(3), set())[0]]


def test_truncated_json_array_raises(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "q1"},\n  {"id": "q2",\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"broken\.json.*line \d+"):
        list(read_questions(f"json:{path}"))
    with pytest.raises(DataFormatError, match=r"broken\.json"):
        list(read_questions(f"diasafety:{path}"))


def test_json_object_instead_of_array_raises(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"id": "q1"}', encoding="utf-8")
    with pytest.raises(DataFormatError, match="expected a JSON array"):
        list(read_questions(str(path)))


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=QUESTION_SCHEMA), path)


def test_parquet_file_and_directory_round_trip(tmp_path):
    rows = [question(i) for i in range(5)]
    folder = tmp_path / "parts"
    folder.mkdir()
    write_parquet(folder / "b.parquet", rows[3:])
    write_parquet(folder / "a.parquet", rows[:3])
    (folder / "notes.txt").write_text("not data")
    records = list(read_questions(str(folder)))  # a directory of .parquet files is guessed
    assert [r.record for r in records] == rows  # files in sorted order
    assert records[0].location == f"{folder / 'a.parquet'}:row 1"
    assert records[3].location == f"{folder / 'b.parquet'}:row 1"
    single = list(read_questions(f"parquet:{folder / 'a.parquet'}"))
    assert [r.record for r in single] == rows[:3]
    assert validate_all(records)[1:] == ({}, {})


def test_corrupt_parquet_raises(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataFormatError, match=r"bad\.parquet"):
        list(read_questions(str(path)))


def test_parquet_without_schema_columns_raises(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(DataFormatError, match="lacks column"):
        list(read_questions(str(path)))


def test_hf_save_to_disk_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [question(i) for i in range(4)]
    rows[1]["answer"] = None
    path = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    records = list(read_questions(f"hf:{path}"))
    assert [r.record for r in records] == rows
    assert records[2].location == f"{path}:row 3"
    assert validate_all(records)[1:] == ({}, {})

    dd = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(dd))
    assert [r.record for r in read_questions(f"hf:{dd}:test")] == rows[:2]
    with pytest.raises(ValueError, match="no split 'train'"):
        list(read_questions(f"hf:{dd}"))


# ---------------------------------------------------------------------------------------------
# specs, limits, CSV edge cases


def test_unknown_format_lists_known_formats(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'nope'") as info:
        read_questions(f"nope:{tmp_path}/x.jsonl")
    assert all(name in str(info.value) for name in FORMATS)


def test_missing_path_and_unguessable_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_questions(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_questions(f"xstest:{tmp_path / 'missing.csv'}")
    path = tmp_path / "data.txt"
    path.write_text("x")
    with pytest.raises(ValueError, match="cannot guess the format") as info:
        read_questions(str(path))
    assert "jsonl" in str(info.value)


def test_limit(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(question(i)) + "\n" for i in range(10)), encoding="utf-8")
    assert [r.record["id"] for r in read_questions(str(path), limit=3)] == ["q0", "q1", "q2"]
    assert list(read_questions(str(path), limit=0)) == []
    assert len(list(read_questions(str(path), limit=100))) == 10
    with pytest.raises(ValueError):
        read_questions(str(path), limit=-1)


def test_limit_on_shared_data():
    path = shared("cold/train.csv")
    records = list(read_questions(f"cold:{path}", limit=5))
    assert [r.record["id"] for r in records] == [f"cold-train-{i}" for i in range(5)]


def test_csv_without_expected_header_raises(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text("id,text\n1,hello\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"prompts\.csv.*lacks column"):
        list(read_questions(f"xstest:{path}"))
    mmlu = tmp_path / "astronomy_test.csv"
    mmlu.write_text("What?,a,b,c,d,A\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"astronomy_test\.csv.*lacks column"):
        list(read_questions(f"cmmlu:{mmlu}"))


def test_csv_bad_rows_become_errors(tmp_path):
    path = tmp_path / "xstest_prompts.csv"
    path.write_text(
        "id,prompt,type,label,focus,note\n"
        "1,How do I kill a process?,homonyms,safe,kill,\n"
        "2,Multi\nline,homonyms,maybe,x,\n"  # an unquoted line break: two broken rows
        "3,too,few\n"
        '4,"A prompt\r\nover lines",contrast,UNSAFE,x,\n'
        "5,,homonyms,safe,x,\n",
        encoding="utf-8", newline="",
    )
    records = list(read_questions(f"xstest:{path}"))
    assert [r.location.rsplit(":", 1)[1] for r in records] == ["2", "3", "4", "5", "6", "8"]
    errors = [r.error for r in records]
    assert errors[0] is None and records[0].record["answer"] == 0
    assert errors[1] == ("row", "expected 6 columns, got 2")  # "2,Multi"
    assert errors[2] == ("row", "expected 6 columns, got 5")  # "line,homonyms,maybe,x,"
    assert errors[3] == ("row", "expected 6 columns, got 3")
    assert errors[4] is None and records[4].record["answer"] == 1  # labels ignore case
    assert records[4].record["question"] == judge_question("en", "request", "A prompt\r\nover lines")
    assert errors[5] == ("prompt", "prompt is empty")


def test_unknown_labels(tmp_path):
    prompts = tmp_path / "xstest_prompts.csv"
    prompts.write_text("id,prompt,type,label,focus,note\n1,Hi,homonyms,maybe,x,\n", encoding="utf-8")
    (raw,) = read_questions(f"xstest:{prompts}")
    assert raw.record is None and raw.error[0] == "label" and "'maybe'" in raw.error[1]

    completions = tmp_path / "xstest_v2_completions_toy.csv"
    completions.write_text(
        "id,type,prompt,completion,annotation_1,annotation_2,agreement,final_label\n"
        "v2-1,homonyms,Hi,Hello,x,x,TRUE,4_other\n"
        "v2-2,homonyms,Hi,Hello,x,x,TRUE,3_partial_refusal\n",
        encoding="utf-8",
    )
    bad, good = read_questions(f"xstest-completions:{completions}")
    assert bad.error[0] == "final_label" and "4_other" in bad.error[1]
    assert good.record["answer"] == 2 and good.record["source"] == "xstest-completions-toy"
    assert good.record["id"] == "xstest-completions-toy-v2-2"

    mmlu = tmp_path / "astronomy_test.csv"
    mmlu.write_text("What?,a,b,c,d,E\nWhy?,a,b,c,d,b\n", encoding="utf-8")
    bad, good = read_questions(f"mmlu:{mmlu}")
    assert bad.error[0] == "answer" and good.record["answer"] == 1


def test_cold_bom_and_non_utf8_row(tmp_path):
    path = tmp_path / "dev.csv"
    body = ",split,topic,label,TEXT\n1,dev,race,1,好\n1,dev,gender,0,".encode("utf-8") + b"\xff\xfe\n"
    path.write_bytes(b"\xef\xbb\xbf" + body + "2,dev,region,2,坏\n".encode("utf-8"))
    records = list(read_questions(f"cold:{path}"))
    assert [r.record and r.record["id"] for r in records[:2]] == ["cold-dev-0", "cold-dev-1"]
    assert records[0].record["category"] == "race" and records[0].record["answer"] == 1
    # bad bytes are replaced, so validation (not the loader) rejects the row and the file goes on
    assert validate_record(records[1].record, set())[1][0] == "question"
    assert records[2].error[0] == "label"


def test_embedded_sample():
    from importlib import resources

    resource = resources.files("safeconf.data").joinpath("embedded").joinpath("questions.jsonl")
    if not resource.is_file():
        pytest.skip("the embedded sample safeconf/data/embedded/questions.jsonl is not written yet")
    records = list(read_questions("embedded"))
    assert records and all(r.location.startswith(f"{resource}:") for r in records)
    clean, errors, rejects = validate_all(records)
    assert errors == {} and rejects == {}
    assert list(read_questions("embedded", limit=1))[0].location == records[0].location
