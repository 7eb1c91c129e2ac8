"""benchmarks/gpu_check.py at its tiniest on the CPU: both checks run and report, and on one device the two scoring
runs and the runs with and without gradient checkpointing agree."""

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_gpu_check_tiny_cpu_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--scale", "tiny", "--layers", "2", "--dtype", "float32",
                    "--prompts", "4", "--batch-size", "2", "--micro-batch", "2", "--seq-len", "32",
                    "--target-tokens", "8", "--warmup", "1", "--steps", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]

    scoring = report["scoring"]
    assert scoring["prompts"] == 4 and scoring["device"]["s_per_batch"] > 0 and scoring["cpu"]["s_per_batch"] > 0
    assert scoring["max_abs_logprob_diff"] < 1e-5  # CPU against CPU, fp32, the same weights
    assert scoring["argmax_agree_all"] and scoring["argmax_agree"] == 4

    training = report["training"]
    runs = [(r["layers"], r["checkpointing"]) for r in training["runs"]]
    assert runs == [(1, False), (1, True), (2, False), (2, True)]
    for run in training["runs"]:
        assert run["loss_finite"] and len(run["losses"]) == 2 and run["tokens_per_s"] > 0 and run["peak_mb"] > 0
    # the same weights, batch and dropout masks: checkpointing recomputes, it must not change the losses
    assert training["loss_diff_checkpointing"] < 1e-4
    assert all(math.isfinite(training[f"projection_{k}"]["peak_mb"]) for k in ("plain", "checkpointing"))
