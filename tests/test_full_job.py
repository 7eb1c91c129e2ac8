"""jobs/full.py: stages recorded with their fingerprints, skipped when up to date, redone when their inputs
change; --from trains afresh; a failed stage is named with its cause; the job's last lines carry the
evaluation's warnings. Fast tests use the stub stage runners of test_stages; the slow one runs the real thing."""

import importlib.util
import json
import logging
from pathlib import Path

import pytest
from test_stages import ran, stub_runners  # noqa: F401 (a fixture)

from safeconf import stages

REPO = Path(__file__).resolve().parents[1]


def load_job():
    spec = importlib.util.spec_from_file_location("full_job", REPO / "jobs" / "full.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_stage_is_refused(capsys):
    with pytest.raises(SystemExit):
        load_job().main(["--stages", "pipeline,deploy"])
    assert "unknown stages ['deploy']" in capsys.readouterr().err


def test_the_last_lines_name_the_report_and_every_warning_of_the_evaluation(tmp_path, stub_runners, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert load_job().main([f"out={out}"]) == 0
    printed = capsys.readouterr().out
    final = json.loads((out / "full_run.json").read_text())
    ran_stages = ["pipeline", "train", "evaluate"]  # guard-tuning is off without guard.data
    assert list(final["stage_seconds"]) == ran_stages and final["up_to_date"] == [] and final["off"] == ["guard"]
    lines = printed.rstrip().splitlines()
    assert lines[-2:] == [f"report: {out}/eval/report.md",
                          "warning: calibration set of 4 questions: at least 22 are needed to set a threshold"]
    assert load_job().main([f"out={out}"]) == 0  # all up to date: still the report and its warnings
    assert json.loads((out / "full_run.json").read_text())["up_to_date"] == ran_stages
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("warning: calibration set of 4")


def test_a_failed_stage_is_named_with_its_cause(tmp_path, stub_runners, capsys):  # noqa: F811
    def broken(*args, **kwargs):
        raise FileNotFoundError("no such file: sft/train.parquet")

    stages.RUNNERS["train"] = broken
    with pytest.raises(FileNotFoundError):
        load_job().main([f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert "jobs/full.py: stage 'train' failed: FileNotFoundError: no such file: sft/train.parquet" in err
    assert "rerun to continue from 'train'" in err
    assert (tmp_path / "run" / "stages" / "pipeline.json").exists()


def test_a_stage_whose_input_is_stale_stops_the_job_before_anything_runs(tmp_path, stub_runners, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert load_job().main([f"out={out}", "--stages", "pipeline"]) == 0
    ran(stub_runners)
    assert load_job().main([f"out={out}", "--stages", "evaluate,train", "sampling.k=8"]) == 2
    assert "stage 'train' reads the output of stage 'pipeline', which is not up to date" in capsys.readouterr().err
    assert ran(stub_runners) == []
    assert load_job().main([f"out={out}", "--stages", "evaluate,train"]) == 0
    assert ran(stub_runners) == ["train", "evaluate"]  # in pipeline order, whatever the order given


@pytest.mark.slow
def test_reruns_skip_redo_and_train_afresh_as_they_say(local_ray, tmp_path, caplog):
    """The real pipeline and a one-step training: a rerun skips both; sampling.k=2 redoes both under a new
    Ray Train run; --from train trains from step 0 instead of restoring the finished run."""
    caplog.set_level(logging.INFO, logger="safeconf")
    job = load_job()
    out = tmp_path / "run"
    tiny = [f"out={out}", "limit=2", "engine.kind=hf", "sampling.k=1", "sampling.temperature=0.7",
            "mutation.operators=shuffle", "mutation.variants_per_question=1", "sft.val_fraction=0.5",
            "sft.seed=2", "sft.include_variants=true",  # one question each way; 2 examples (original + variant) to train on
            "train.max_steps=1", "train.micro_batch_size=2", "train.log_every=1", "model.dtype=float32"]
    assert job.main(["--stages", "pipeline,train", *tiny]) == 0
    marker = json.loads((out / "stages" / "pipeline.json").read_text())
    assert marker["summary"]["rows_read"] == 2 and (out / "sft" / "train.parquet").exists()
    assert marker["fingerprint"] == stages.job_plans(job.load_config(None, tiny))["pipeline"].fingerprint
    first = json.loads((out / "train" / "train_summary.json").read_text())
    assert first["starts"] == [0] and first["steps"] == 1 and first["run"]["name"].startswith("safeconf-train-")
    summary_mtime = (out / "summary.json").stat().st_mtime_ns

    caplog.clear()
    assert job.main(["--stages", "pipeline,train", *tiny]) == 0  # up to date: nothing rewritten
    assert (out / "summary.json").stat().st_mtime_ns == summary_mtime
    assert "stage pipeline up to date (fingerprint" in caplog.text and "stage train up to date" in caplog.text

    caplog.clear()
    assert job.main(["--stages", "pipeline,train", "--from", "train", *tiny]) == 0
    again = json.loads((out / "train" / "train_summary.json").read_text())
    assert again["run"]["name"] == first["run"]["name"] and again["run"]["fresh"]
    assert again["starts"] == [0] and again["steps"] == 1  # trained, not restored after zero steps
    assert (out / "summary.json").stat().st_mtime_ns == summary_mtime

    caplog.clear()
    assert job.main(["--stages", "pipeline,train", *tiny, "sampling.k=2"]) == 0
    assert "stage pipeline: inputs changed: sampling.k 1 -> 2" in caplog.text
    changed = json.loads((out / "train" / "train_summary.json").read_text())
    assert changed["run"]["name"] != first["run"]["name"] and changed["starts"] == [0] and not changed["run"]["resumed"]
    assert json.loads((out / "full_run.json").read_text())["stage_seconds"]["pipeline"] > 0
