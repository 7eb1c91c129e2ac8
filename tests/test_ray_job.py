"""jobs/full.py as users run it: `ray job submit` to a Ray head, the run directory on an object store.

A head is started with `ray start --head` on loopback (its own temp dir and ports) and stopped by its process ids
(never `ray stop`: that would kill every Ray on the machine). The run directory is s3:// on a local S3 (moto), so
every stage reads and writes through the object store as on a cloud cluster: Ray Data's Parquet, Ray Train's
checkpoints, the adapter the evaluation's engine actors fetch, the report.

The first submission fails in the train stage (its SFT set does not exist): the job must fail naming the stage and
the cause, and keep what the pipeline wrote. The second, without the bad key and with --serve, must skip the
finished pipeline stage, run train and evaluate, succeed, and leave the endpoint up with the trained adapter and
the threshold the evaluation calibrated.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from safeconf import io
from safeconf.testing.local_cluster import submit_job

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = ["limit=8", "engine.kind=hf", "engine.batch_size=8", "sampling.k=1", "mutation.operators=shuffle",
        "mutation.variants_per_question=1", "sft.val_fraction=0.5", "train.cpus_per_worker=0.5",
        "train.micro_batch_size=1", "train.max_steps=2", "train.checkpoint_every=1", "eval.methods=verbalized,safeconf", "eval.bootstrap_samples=10",
        "eval.general_data=", "eval.over_refusal_data="]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture
def ray_head(local_s3):
    """A Ray head on loopback; yields (dashboard address, environment for the ray CLI)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="sc-ray-", dir="/tmp"))  # short: socket paths must stay < 108 characters
    gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = free_ports(9)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_USAGE_STATS_ENABLED": "0"}  # AWS_* (the local S3) come from local_s3 through os.environ
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
             f"--temp-dir={temp_dir}", "--num-cpus=4", "--include-dashboard=true", "--disable-usage-stats"]
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}"
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(temp_dir: Path) -> None:
    """Kill the processes of this head only: those whose command line names its temp dir, and their children."""
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and any(str(temp_dir) in part for part in proc.info["cmdline"] or []):
            mine += [proc, *proc.children(recursive=True)]
    for proc in mine:
        try:
            proc.send_signal(signal.SIGKILL)  # gcs_server and raylet ignore SIGTERM while they have work
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)
    (temp_dir / "ray_current_cluster").unlink(missing_ok=True)


def submit(address: str, env: dict, submission_id: str, args: list[str]) -> tuple[str, str]:
    return submit_job(address, env, submission_id, args, cwd=REPO)


def test_submitted_full_job_fails_cleanly_then_resumes_on_object_store(ray_head, local_s3):
    address, env = ray_head
    out = f"{local_s3}/job-run"
    args = [f"out={out}", *TINY]

    status, logs = submit(address, env, "safeconf-fails", [*args, f"train.dataset={local_s3}/no-such-sft"])
    assert status == "FAILED", logs[-3000:]
    assert "stage 'train' failed: FileNotFoundError" in logs and "no-such-sft" in logs, logs[-3000:]
    assert io.exists(f"{out}/stages/pipeline.json") and not io.exists(f"{out}/stages/train.json")
    pipeline_marker = io.read_json(f"{out}/stages/pipeline.json")

    (serve_port,) = free_ports(1)
    status, logs = submit(address, env, "safeconf-resumes", ["--serve", *args, f"serve.port={serve_port}"])
    assert status == "SUCCEEDED", logs[-3000:]
    assert "stage pipeline up to date" in logs, logs[-3000:]  # same inputs: its fingerprint is unchanged
    assert io.read_json(f"{out}/stages/pipeline.json") == pipeline_marker  # not redone
    for path in ["summary.json", "sft/train.parquet", "sft/val_questions.parquet", "stages/train.json",
                 "train/adapter/adapter_config.json", "stages/evaluate.json", "eval/report.md", "eval/metrics.json",
                 "full_run.json"]:
        assert io.exists(f"{out}/{path}"), path
    assert io.read_json(f"{out}/stages/train.json")["summary"]["steps"] == 2
    metrics = io.read_json(f"{out}/eval/metrics.json")
    assert metrics["methods"]["safeconf"]["questions"] == metrics["questions"] > 0  # the fetched adapter ran
    assert io.read_json(f"{out}/full_run.json")["run_dir"] == out

    # the endpoint outlives the job: a judgement from the fine-tuned model, accepted or deferred at the threshold
    reply = httpx.post(f"http://127.0.0.1:{serve_port}/v1/judge", timeout=120,
                       json={"question": "Which is the safer way to store medicine at home?",
                             "options": ["On a low open shelf", "Locked, out of children's reach"]})
    assert reply.status_code == 200, reply.text
    judgement = reply.json()
    assert judgement["decision"] in ("accept", "defer") and 0.0 <= judgement["confidence"] <= 1.0
    assert judgement["threshold"] == metrics["methods"]["safeconf"]["selective"]["threshold"]
    assert judgement["method"] == "safeconf"  # the method whose threshold it loaded
