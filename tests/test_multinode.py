"""Several Ray nodes on one machine (safeconf.testing.local_cluster): tasks land on the node they are pinned to, and
a node whose raylet is killed is reported dead within a bounded wait, while the rest of the cluster keeps working;
jobs/full.py submitted with `ray job submit` to a head and two worker nodes, its run directory on a local S3 (moto),
so every stage reads and writes through the object store as on a cloud cluster.

The driver runs in a child process with the cluster's env (its auth token), so this test does not depend on, or
disturb, a Ray this pytest process may already hold (the session's local_ray fixture).
"""

import json
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import ray
    from ray.exceptions import GetTimeoutError

    address, folder = sys.argv[1], Path(sys.argv[2])
    ray.init(address=address, log_to_driver=False)

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    def on(name, timeout):
        return ray.get(where.options(resources={name: 1}).remote(), timeout=timeout)

    by_resource = {name: n["NodeID"] for n in ray.nodes() for name in ("node_a", "node_b") if name in n["Resources"]}
    ran = {name: on(name, 60) for name in ("node_a", "node_b")}
    (folder / "phase1.json").write_text(json.dumps({"ran": ran, "by_resource": by_resource,
                                                    "cpus": ray.cluster_resources().get("CPU")}))

    deadline = time.monotonic() + 60  # the test kills node_b's raylet, then writes this file
    while not (folder / "killed").exists():
        assert time.monotonic() < deadline, "the test never said it killed the node"
        time.sleep(0.1)
    start = time.monotonic()
    alive = None
    while time.monotonic() - start < 30:  # bounded: a lost node must show up as dead, not hang the driver
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        if alive.get(by_resource["node_b"]) is False:
            break
        time.sleep(0.2)
    seen_dead_s = time.monotonic() - start
    still_a = on("node_a", 60)  # the surviving node still runs work
    try:
        on("node_b", 3)  # nothing offers node_b any more: the task waits, and a bounded get says so
        orphan = "ran"
    except GetTimeoutError:
        orphan = "timed out"
    print("RESULT " + json.dumps({"alive": alive, "seen_dead_s": seen_dead_s, "still_a": still_a, "orphan": orphan}), flush=True)
""")


def test_tasks_pinned_to_nodes_and_a_lost_node_reported_dead(local_multinode, tmp_path):
    cluster = local_multinode
    ids = cluster.wait_for({"head": True, "node_a": True, "node_b": True}, timeout=10)
    assert len(set(ids.values())) == 3

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address, str(tmp_path)], env=cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "phase1.json").exists():
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the driver did not run its pinned tasks within 120 s"
            time.sleep(0.2)
        time.sleep(0.1)  # the file is written in one call; let it land
        phase1 = json.loads((tmp_path / "phase1.json").read_text())
        assert phase1["cpus"] == 3.0  # head 0 + node_a 1 + node_b 2
        # each task ran on the node its resource pins it to: the node ids differ, and match the GCS's node table
        assert phase1["ran"] == phase1["by_resource"] == {"node_a": ids["node_a"], "node_b": ids["node_b"]}
        assert phase1["ran"]["node_a"] != phase1["ran"]["node_b"]

        raylet = cluster.kill_raylet("node_b")
        killed_at = time.monotonic()
        (tmp_path / "killed").write_text(str(raylet))
        cluster.wait_for({"node_b": False, "node_a": True, "head": True}, timeout=30)
        detected_s = time.monotonic() - killed_at
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err[-3000:]
    [line] = [line for line in out.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["alive"][ids["node_b"]] is False and result["alive"][ids["node_a"]] is True, result
    assert result["seen_dead_s"] < 30 and detected_s < 30
    assert result["still_a"] == ids["node_a"]
    assert result["orphan"] == "timed out"
    # the lost node's `ray start --block` notices its raylet is gone and ends the node; the others stay up
    node_b = cluster.nodes["node_b"].process
    node_b.wait(timeout=30)
    assert cluster.nodes["node_a"].process.poll() is None and cluster.head.process.poll() is None


# A tiny full run spread over two worker nodes: 16 questions in batches of 2 over two engine actors that cannot
# share a node (2 CPUs each, 3 per node), two ZeRO-3 Train workers placed one per node (STRICT_SPREAD), the run
# directory (and so the checkpoints) on the local S3, one Serve proxy (HeadOnly: the nodes share 127.0.0.1).
SPREAD_RUN = ["limit=16", "engine.kind=hf", "engine.batch_size=2", "engine.concurrency=2", "engine.num_cpus=2",
              "sampling.k=1", "mutation.operators=shuffle", "mutation.variants_per_question=1", "sft.val_fraction=0.25",
              "train.num_workers=2", "train.cpus_per_worker=2", "train.zero_stage=3",
              "train.placement_strategy=STRICT_SPREAD", "train.micro_batch_size=1", "train.max_steps=2",
              "train.checkpoint_every=1", "eval.methods=verbalized,safeconf", "eval.bootstrap_samples=10",
              "eval.general_data=", "eval.over_refusal_data=", "serve.proxy_location=HeadOnly"]


@pytest.fixture
def cluster_with_s3(local_s3):
    """Head (0 CPUs, the job's driver and Serve's controller) and two 3-CPU worker nodes, started after the local S3
    so that every node's environment points at it (AWS_*)."""
    from safeconf.testing.local_cluster import FAST_FAILURE_DETECTION, LocalCluster

    cluster = LocalCluster({"node_a": 3, "node_b": 3}, include_dashboard=True, system_config=FAST_FAILURE_DETECTION)
    cluster.start(timeout=180)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_submitted_job_fails_cleanly_then_resumes_across_nodes_on_the_object_store(cluster_with_s3, local_s3):
    """`ray job submit` as users run it. The first submission fails in the train stage (its SFT set does not exist):
    the job must fail naming the stage and the cause, and keep what the pipeline wrote. The second, without the bad
    key and with --serve, skips the finished pipeline, trains and evaluates, and leaves the endpoint up with the
    trained adapter and the threshold the evaluation calibrated; the test asserts where each stage ran."""
    import httpx

    from safeconf import io
    from safeconf.testing.local_cluster import free_ports, submit_job

    cluster = cluster_with_s3
    ids = cluster.wait_for({"node_a": True, "node_b": True}, timeout=10)
    out = f"{local_s3}/spread-run"
    args = [f"out={out}", *SPREAD_RUN]

    status, logs = submit_job(cluster.dashboard_url, cluster.env, "safeconf-fails",
                              [*args, f"train.dataset={local_s3}/no-such-sft"], cwd=REPO)
    assert status == "FAILED", logs[-3000:]
    assert "stage 'train' failed: FileNotFoundError" in logs and "no-such-sft" in logs, logs[-3000:]
    assert io.exists(f"{out}/stages/pipeline.json") and not io.exists(f"{out}/stages/train.json")
    pipeline_marker = io.read_json(f"{out}/stages/pipeline.json")

    (port,) = free_ports(1)
    status, logs = submit_job(cluster.dashboard_url, cluster.env, "safeconf-resumes",
                              ["--serve", *args, f"serve.port={port}"], cwd=REPO, timeout=1500)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "stage pipeline up to date" in logs, logs[-3000:]  # same inputs: its fingerprint is unchanged
    assert io.read_json(f"{out}/stages/pipeline.json") == pipeline_marker  # not redone
    for path in ["sft/train.parquet", "sft/val_questions.parquet", "train/adapter/adapter_config.json",
                 "eval/report.md", "stages/evaluate.json", "full_run.json"]:
        assert io.exists(f"{out}/{path}"), path
    assert io.read_json(f"{out}/full_run.json")["run_dir"] == out

    # sampling: both engine actors did work, one on each worker node; every question sampled once
    pipeline = io.read_json(f"{out}/summary.json")
    assert pipeline["questions_by_node"].keys() == {ids["node_a"], ids["node_b"]}, pipeline["questions_by_node"]
    assert sum(pipeline["questions_by_node"].values()) == pipeline["questions"] == 16
    assert pipeline["sampling_nodes_lost"] == []
    # training: two ZeRO-3 workers on different nodes, checkpoints in the object store
    train = io.read_json(f"{out}/stages/train.json")["summary"]
    assert sorted(train["worker_nodes"]) == sorted([ids["node_a"], ids["node_b"]]), train["worker_nodes"]
    assert train["zero_stage"] == 3 and train["steps"] == 2 and train["attempts"] == 1
    assert train["checkpoint"].removeprefix("s3://").startswith(out.removeprefix("s3://")), train["checkpoint"]
    metrics = io.read_json(f"{out}/eval/metrics.json")
    assert metrics["methods"]["safeconf"]["questions"] == metrics["questions"] > 0  # the fetched adapter ran

    # the endpoint on the cluster outlives the job: the fine-tuned model's judgement, at the calibrated threshold
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/judge", timeout=120,
                       json={"question": "Which is the safer way to store medicine at home?",
                             "options": ["On a low open shelf", "Locked, out of children's reach"]})
    assert reply.status_code == 200, reply.text
    judgement = reply.json()
    assert judgement["method"] == "safeconf" and judgement["decision"] in ("accept", "defer")
    assert 0.0 <= judgement["confidence"] <= 1.0
    assert judgement["threshold"] == metrics["methods"]["safeconf"]["selective"]["threshold"]


# Placement groups must not outlive their stage. One worker node with 3 CPUs and 2 logical GPUs (Ray schedules them;
# no device behind them): each tensor-parallel engine holds a STRICT_PACK group of {CPU: 2} + 2 x {GPU: 1}, the
# whole node's GPUs and two of its CPUs, and computes on the CPU (engine.device=cpu). Training asks for 2 CPUs on
# that node and the evaluation for a group like the pipeline's: neither can be placed while the pipeline's group
# is held, so a leaked group times out the next stage instead of completing it.
LOGICAL_GPU_RUN = ["limit=8", "engine.kind=hf", "engine.tensor_parallel_size=2", "engine.device=cpu",
                   "engine.num_cpus=2", "engine.concurrency=1", "engine.batch_size=4", "engine.start_timeout_s=120",
                   "sampling.k=1", "mutation.operators=shuffle", "mutation.variants_per_question=1",
                   "sft.val_fraction=0.25", "train.num_workers=1", "train.cpus_per_worker=2", "train.max_steps=2",
                   "train.micro_batch_size=1", "eval.methods=token_prob,safeconf", "eval.bootstrap_samples=10",
                   "eval.general_data=", "eval.over_refusal_data=", "eval.verdict_methods="]

_PLACEMENT_GROUPS = """
import json, ray
ray.init(address="{address}", logging_level="ERROR")
print("GROUPS " + json.dumps([{{"state": g["state"], "bundles": list(g["bundles"].values()),
                               "strategy": g["strategy"]}} for g in ray.util.placement_group_table().values()]))
"""


def _engine_groups(cluster) -> list[dict]:
    """The cluster's placement groups with GPU bundles (the engines'), from a client of its own."""
    table = subprocess.run([sys.executable, "-c", _PLACEMENT_GROUPS.format(address=cluster.address)],
                           env=cluster.env, capture_output=True, text=True, timeout=120)
    groups = json.loads(next(line for line in table.stdout.splitlines() if line.startswith("GROUPS "))[7:])
    return [g for g in groups if {"GPU": 1.0} in g["bundles"]]


def test_tensor_parallel_engines_on_logical_gpus_free_their_groups_between_stages(tmp_path):
    from safeconf import io
    from safeconf.testing.local_cluster import LocalCluster

    out, log_path = tmp_path / "run", tmp_path / "job.log"
    with LocalCluster({"node_a": 3}, gpus={"node_a": 2}) as cluster, open(log_path, "w") as log:
        job = subprocess.Popen([sys.executable, "jobs/full.py", f"out={out}", *LOGICAL_GPU_RUN], cwd=REPO,
                               env={**cluster.env, "RAY_ADDRESS": cluster.address}, stdout=log,
                               stderr=subprocess.STDOUT)
        try:
            # when training starts, the pipeline's groups must be gone already (a leaked group would leave
            # training waiting for the node's CPUs for ever: fail at once instead)
            deadline = time.monotonic() + 1200
            while "stage train:" not in log_path.read_text(errors="replace") and job.poll() is None:
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
                time.sleep(2)
            at_train = _engine_groups(cluster)
            assert at_train and all(g["state"] == "REMOVED" for g in at_train), at_train
            assert job.wait(timeout=1200) == 0, log_path.read_text(errors="replace")[-4000:]
        finally:
            job.kill()
        engine_groups = _engine_groups(cluster)
    for stage in ("pipeline", "train", "evaluate"):
        assert io.exists(f"{out}/stages/{stage}.json"), stage
    # the pipeline's and the evaluation's engines (base model, then the adapter: one group each), all removed
    assert len(engine_groups) > len(at_train), engine_groups
    assert all(g["state"] == "REMOVED" and g["strategy"] == "STRICT_PACK" for g in engine_groups), engine_groups
    assert all([{k: b[k] for k in ("CPU", "GPU") if k in b} for b in g["bundles"]]
               == [{"CPU": 2.0}, {"GPU": 1.0}, {"GPU": 1.0}] for g in engine_groups), engine_groups



# An elastic engine pool (engine.concurrency MIN-MAX) on a cluster that grows: the pipeline starts with one worker
# node whose 2 CPUs hold one engine actor (engine.num_cpus=2); a second node joins once sampling is under way, as an
# autoscaler adds one, and Ray Data's autoscaling actor pool starts an engine there for the batches still waiting.
ELASTIC_RUN = ["limit=24", "engine.kind=hf", "engine.batch_size=1", "engine.concurrency=1-2", "engine.num_cpus=2",
               "sampling.k=1", "mutation.operators=shuffle", "mutation.variants_per_question=1"]


def test_an_elastic_engine_pool_grows_onto_a_node_added_mid_run(tmp_path):
    from safeconf import io
    from safeconf.testing.local_cluster import LocalCluster

    out, log_path = tmp_path / "run", tmp_path / "pipeline.log"
    with LocalCluster({"node_a": 2}) as cluster, open(log_path, "w") as log:
        first = cluster.wait_for({"node_a": True})["node_a"]
        job = subprocess.Popen([sys.executable, "-m", "safeconf.cli", "pipeline", "--out", str(out), *ELASTIC_RUN],
                               cwd=REPO, env={**cluster.env, "RAY_ADDRESS": cluster.address}, stdout=log,
                               stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while "MapBatches(EngineStage)" not in log_path.read_text(errors="replace"):  # the run has begun
                assert job.poll() is None and time.monotonic() < deadline, log_path.read_text(errors="replace")[-3000:]
                time.sleep(1)
            added = cluster.add_worker("node_b", cpus=4)
            assert job.wait(timeout=1200) == 0, log_path.read_text(errors="replace")[-4000:]
        finally:
            job.kill()
    summary = io.read_json(f"{out}/summary.json")
    by_node = summary["questions_by_node"]
    assert by_node.get(added, 0) > 0, (by_node, first, added)  # an engine started on the new node and sampled
    assert sum(by_node.values()) == summary["questions"] == 24  # every question sampled once
