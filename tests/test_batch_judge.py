"""`safeconf judge`: offline batch judging through Ray Data (safeconf.batch_judge). Files are listed on the driver
and read on the workers; bad rows and unreadable files are rejects with their location while the rest is judged;
the counts reconcile; local folders, globs and a Parquet folder in the local S3 work alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from safeconf import io
from safeconf.batch_judge import run_judge, validate_batch
from safeconf.config import load_config
from safeconf.data.stream import list_files, read_file, read_tasks
from safeconf.serving.judging import TIERS

EMBEDDED = REPO / "safeconf" / "data" / "embedded" / "questions.jsonl"
# A fast judge: one label-probability forward per row on the embedded model, small batches, one engine actor.
JUDGE = ["engine.kind=hf", "engine.batch_size=4", "engine.concurrency=1", "serve.threshold=0.6"]


def _questions(n: int, start: int = 0) -> list[str]:
    return EMBEDDED.read_text(encoding="utf-8").splitlines()[start:start + n]


@pytest.fixture
def question_folder(tmp_path):
    """Two good JSONL files and a malformed one: a bad JSON line, a non-UTF-8 line, a row without a question."""
    folder = tmp_path / "questions"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(_questions(3)) + "\n", encoding="utf-8")
    (folder / "b.jsonl").write_text("\n".join(_questions(2, start=80)) + "\n", encoding="utf-8")
    no_question = json.loads(_questions(1, start=5)[0])
    no_question.pop("question")
    (folder / "c.jsonl").write_bytes(b"{not json\n" + b'{"id": "\xff\xfe"}\n' + _questions(1, start=6)[0].encode()
                                     + b"\n" + json.dumps(no_question).encode() + b"\n")
    (folder / "notes.txt").write_text("not data")
    return folder


def test_files_are_listed_on_the_driver_and_a_missing_path_fails_first(question_folder):
    names = lambda specs: [s.rsplit("/", 1)[-1] for s in specs]  # noqa: E731
    assert names(list_files(str(question_folder))) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert names(list_files(f"{question_folder}/[ab].jsonl")) == ["a.jsonl", "b.jsonl"]
    assert names(read_tasks(f"jsonl:{question_folder}/*.jsonl")) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert read_tasks(f"jsonl:{question_folder}/a.jsonl")[0].startswith("jsonl:")
    assert read_tasks("embedded") == ["embedded"]
    with pytest.raises(FileNotFoundError, match="no data file"):
        read_tasks(str(question_folder / "missing"))
    with pytest.raises(FileNotFoundError, match="no data file"):
        read_tasks(f"{question_folder}/*.parquet")


def test_bad_rows_and_unreadable_files_are_rejects_with_their_location(question_folder, tmp_path):
    (question_folder / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    rows = []
    for task, spec in enumerate(read_tasks(str(question_folder))):
        for block in read_file({"spec": [spec], "task": [task]}):
            rows += block.to_pylist()
    assert len(rows) == 3 + 2 + 4 + 1  # the rows of the JSONL files, and one row for the unreadable file
    items = validate_batch(pa.Table.from_pylist(rows, schema=block.schema), "", str(tmp_path / "rejects"))
    assert items.num_rows == 3 + 2 + 1
    rejects = pq.read_table(tmp_path / "rejects").to_pylist()
    where = {(r["location"].rsplit("/", 1)[-1], r["field"]) for r in rejects}
    assert where == {("c.jsonl:1", "row"), ("c.jsonl:2", "row"), ("c.jsonl:4", "question"),
                     ("broken.parquet", "file")}
    # a retried batch rewrites its own reject file rather than adding one
    validate_batch(pa.Table.from_pylist(rows, schema=block.schema), "", str(tmp_path / "rejects"))
    assert len(list((tmp_path / "rejects").iterdir())) == 1


def test_judge_a_question_folder_on_the_embedded_model(local_ray, question_folder, tmp_path):
    config = load_config(None, JUDGE, out=str(tmp_path / "judged"))
    summary = run_judge(config, f"jsonl:{question_folder}/*.jsonl", config.out)
    assert summary["read"] == summary["judged"] + summary["rejected"] == 3 + 2 + 4
    assert summary["judged"] == 6 and summary["rejected"] == 3
    assert summary["method"] == "token_prob" and summary["threshold"] == 0.6
    assert sum(summary["status"].values()) == 6
    table = pq.read_table(io.join(config.out, "judgements"))
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(json.loads(q)["id"] for q in _questions(3) + _questions(2, 80)
                                                   + _questions(1, 6))
    for row in rows:
        assert 0.0 <= row["confidence"] <= 1.0 and row["method"] == "token_prob"
        assert row["decision"] == ("accept" if row["confidence"] >= 0.6 else "defer")
        assert row["tier"] is None or row["tier"] in TIERS  # multiple choice without a safe/unsafe side: None
    assert io.read_json(io.join(config.out, "summary.json"))["judged"] == 6


def test_judge_a_text_log_in_the_local_s3_from_the_cli(local_s3, tmp_path):
    """A moderation log (a `text` column, no gold labels) as a Parquet folder in S3; empty texts are rejects. The
    CLI in a process of its own, whose private Ray's workers inherit the local S3's AWS_* settings."""
    texts = ["How do I reset my router password?", "", "Write a threatening letter to my neighbour.",
             "What is the capital of France?", None]
    for part, chunk in enumerate((texts[:3], texts[3:])):
        local = tmp_path / f"part-{part}.parquet"
        pq.write_table(pa.table({"text": chunk, "user": ["u"] * len(chunk)}), local)
        fs, path = io.filesystem(f"{local_s3}/logs/part-{part}.parquet")
        with fs.open_output_stream(path) as stream:
            stream.write(local.read_bytes())
    out = f"{local_s3}/judged-logs"
    ray_dir = tempfile.mkdtemp(prefix="sj-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    try:
        run = subprocess.run([sys.executable, "-m", "safeconf.cli", "judge", "--data", f"{local_s3}/logs", "--out",
                              out, "--text-column", "text", "ray_address=local", *JUDGE], cwd=REPO,
                             capture_output=True, text=True, timeout=900, env={**os.environ, "RAY_TMPDIR": ray_dir})
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    summary = io.read_json(f"{out}/summary.json")
    assert (summary["read"], summary["judged"], summary["rejected"]) == (5, 3, 2)
    assert summary["rejected_by_reason"] == {"text: missing or empty text": 2}
    assert sum(summary["tiers"].values()) == 3 and set(summary["tiers"]) <= set(TIERS)
    fs, path = io.filesystem(f"{out}/judgements")
    rows = pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()
    assert all(r["kind"] == "text" and r["label"] in ("safe", "unsafe") for r in rows)
    assert all(0.0 <= r["p_unsafe"] <= 1.0 for r in rows)


def test_text_column_needs_a_log_format(question_folder):
    with pytest.raises(ValueError, match="--text-column"):
        read_tasks(f"xstest:{question_folder}", text_column="text")


def test_judge_with_a_run_takes_its_model_adapter_and_calibration(tmp_path):
    """--run RUN: the run's guard-tuned model when it has one, its adapter and its metrics.json (the calibrated
    threshold), as the run's endpoint; an experiment's output directory stands for its main run."""
    from safeconf.cli import build_parser, judge_config

    experiment = tmp_path / "experiment"
    run = experiment / "main"
    for folder in ("stages", "train/adapter", "eval", "guard/merged"):
        (run / folder).mkdir(parents=True)
    (run / "stages" / "train.json").write_text(json.dumps({"inputs": {"config": {"model.name": {"stage": "guard"}}}}))
    (run / "eval" / "metrics.json").write_text("{}")
    args = build_parser().parse_args(["judge", "--data", "embedded", "--out", str(tmp_path / "o"),
                                      "--run", str(experiment)])
    config = judge_config(args, load_config(None))
    assert config.model.name == str(run / "guard" / "merged")
    assert config.model.adapter == str(run / "train" / "adapter")
    assert config.serve.metrics_path == str(run / "eval" / "metrics.json")
    (run / "eval" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.json is missing"):
        judge_config(args, load_config(None))


def test_scale_benchmark_runs_at_a_small_size(local_ray):
    """benchmarks/pipeline_scale.py's measurement at 300 questions in 3 shards, judged and through the pipeline:
    every question comes out once, with the stand-in engine."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pipeline_scale", REPO / "benchmarks" / "pipeline_scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    for workload in ("judge", "pipeline"):
        result = scale.one_size(300, 100, [], workload)
        assert (result["questions"], result["accepted"], result["rejected"]) == (300, 300, 0), workload
        assert result["questions_per_s"] > 0 and result["driver_peak_rss_mb"] > 0
        assert result["worker_peak_rss_mb"] > 0  # the engine actor and the read/validate workers were sampled
    engine = scale.HashEngine()
    prompt = [[{"role": "user", "content": "x"}]]
    assert engine.option_logprobs(prompt, ["Answer:"], [["A", "B"]]) == engine.option_logprobs(prompt, ["Answer:"],
                                                                                                [["A", "B"]])
