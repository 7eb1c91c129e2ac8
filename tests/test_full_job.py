"""jobs/full.py: finished stages are recorded and skipped on a rerun; --from redoes them."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def load_job():
    spec = importlib.util.spec_from_file_location("full_job", REPO / "jobs" / "full.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_rerun_skips_finished_stages_and_from_redoes_them(local_ray, tmp_path):
    job = load_job()
    out = tmp_path / "run"
    tiny = [f"out={out}", "limit=2", "engine.kind=hf", "sampling.k=1", "sampling.temperature=0.7",
            "mutation.operators=shuffle", "mutation.variants_per_question=1", "sft.val_fraction=0.5"]
    assert job.main(["--stages", "pipeline", *tiny]) == 0
    marker = out / "stages" / "pipeline.json"
    recorded = json.loads(marker.read_text())
    assert recorded["summary"]["rows_read"] == 2 and (out / "sft" / "train.parquet").exists()
    summary_mtime = (out / "summary.json").stat().st_mtime_ns

    assert job.main(["--stages", "pipeline", *tiny]) == 0  # finished: skipped, nothing rewritten
    assert (out / "summary.json").stat().st_mtime_ns == summary_mtime
    assert json.loads(marker.read_text()) == recorded

    assert job.main(["--stages", "pipeline", "--from", "pipeline", *tiny]) == 0  # redone
    assert (out / "summary.json").stat().st_mtime_ns != summary_mtime
    assert json.loads((out / "full_run.json").read_text())["stage_seconds"]["pipeline"] > 0


def test_unknown_stage_is_refused(capsys):
    with pytest.raises(SystemExit):
        load_job().main(["--stages", "pipeline,deploy"])
    assert "unknown stages ['deploy']" in capsys.readouterr().err
