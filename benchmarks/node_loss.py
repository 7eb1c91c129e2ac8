"""Losing a worker node mid-run, on a loopback multi-node cluster: what the run redoes and how long it takes.

    .venv/bin/python benchmarks/node_loss.py [--phases sampling,training] [--out runs/node_loss.json]

Each phase starts a fresh cluster (safeconf.testing.local_cluster: a head with 0 CPUs and two 3-CPU worker nodes,
failure detection in ~2 s) and a local S3 (safeconf.testing.local_s3) holding the run directory, and submits
`jobs/full.py` with `ray job submit`, as users do. It follows the job's log, and at a chosen point SIGKILLs the
raylet of node_b (its workers and engine actors die with it), then starts node_c in its place, as an autoscaler
replaces a lost machine (2 CPUs per engine actor / Train worker: the survivor cannot hold both).

- sampling: the pipeline stage alone (48 questions, batches of 2, free-form sampling so that each batch takes a
  while, two engine actors, one per node). Run twice: undisturbed (the baseline), then node_b killed after the
  6th engine batch seen in the job log. Measured: pipeline seconds both times (the difference is the work redone and
  the wait for the replacement), whether every question is in the confidence table exactly once, which nodes
  sampled, what the summary reports lost.
- training: pipeline + train (two ZeRO-3 workers, STRICT_SPREAD, a checkpoint every 3 steps to S3, 12 steps,
  train.max_failures=2), node_b killed once the log shows step 5. Measured: seconds from the kill to the restarted
  worker group's first step, the steps redone (the kill's step minus the checkpoint resumed from), the attempts'
  start steps from the training summary, where the ranks ran at the end.

Every wait is bounded; a phase that does not finish in --time-limit seconds is reported as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safeconf import io
from safeconf.testing.local_cluster import BIN, FAST_FAILURE_DETECTION, LocalCluster
from safeconf.testing.local_s3 import local_s3

REPO = Path(__file__).resolve().parents[1]
COMMON = ["engine.kind=hf", "engine.concurrency=2", "engine.num_cpus=2", "mutation.operators=shuffle",
          "mutation.variants_per_question=1", "eval.general_data=", "eval.over_refusal_data="]
SAMPLING = ["limit=48", "engine.batch_size=2", "sampling.answer_format=free", "sampling.k=2", "sampling.max_tokens=24"]
TRAINING = ["limit=32", "engine.batch_size=4", "sampling.k=1", "sft.val_fraction=0.2", "train.num_workers=2",
            "train.cpus_per_worker=2", "train.zero_stage=3", "train.placement_strategy=STRICT_SPREAD",
            "train.micro_batch_size=1", "train.max_steps=12", "train.epochs=2", "train.checkpoint_every=3",
            "train.log_every=1", "train.max_failures=2"]
ENGINE_BATCH = re.compile(r"engine batch: (\d+) questions")
TRAIN_STEP = re.compile(r"\[safeconf train\] step (\d+) ")
WORKER_GROUP = re.compile(r"\[safeconf train\] \d+ workers, ZeRO-")


class Job:
    """A `ray job submit --no-wait` whose log is read as it grows (bounded calls of `ray job logs`)."""

    def __init__(self, cluster: LocalCluster, submission_id: str, args: list[str]):
        self.cluster, self.id = cluster, submission_id
        subprocess.run([str(BIN / "ray"), "job", "submit", f"--address={cluster.dashboard_url}", "--no-wait",
                        f"--submission-id={submission_id}", "--working-dir=.", "--runtime-env=cluster/runtime_env.yaml",
                        "--", "python", "jobs/full.py", *args], cwd=REPO, env=cluster.env, check=True,
                       capture_output=True, text=True, timeout=300)

    def logs(self) -> str:
        return subprocess.run([str(BIN / "ray"), "job", "logs", f"--address={self.cluster.dashboard_url}", self.id],
                              env=self.cluster.env, capture_output=True, text=True, timeout=60).stdout

    def status(self) -> str:
        found = subprocess.run([str(BIN / "ray"), "job", "status", f"--address={self.cluster.dashboard_url}", self.id],
                               env=self.cluster.env, capture_output=True, text=True, timeout=60).stdout
        final = re.search(rf"Job '{self.id}' (succeeded|failed|stopped)", found)
        return final.group(1).upper() if final else "RUNNING"

    def wait_for(self, pattern: re.Pattern, count: int, deadline: float) -> tuple[str, float]:
        """Poll the log until `pattern` has matched `count` times (or the job ended); (log, when it was seen)."""
        while True:
            text = self.logs()
            if len(pattern.findall(text)) >= count or self.status() != "RUNNING":
                return text, time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id}: {pattern.pattern!r} x{count} not in its log in time")
            time.sleep(0.5)

    def finish(self, deadline: float) -> tuple[str, str]:
        while (status := self.status()) == "RUNNING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still running at the time limit")
            time.sleep(1)
        return status, self.logs()


def new_cluster() -> LocalCluster:
    return LocalCluster({"node_a": 3, "node_b": 3}, include_dashboard=True, system_config=FAST_FAILURE_DETECTION)


def confidence_ids(out: str) -> list[str]:
    return io.read_table(f"{out}/confidence", columns=["id"]).column("id").to_pylist()


def sampling_run(bucket: str, name: str, kill_after: int | None, deadline: float) -> dict:
    out = f"{bucket}/{name}"
    with new_cluster() as cluster:
        ids = cluster.wait_for({"node_a": True, "node_b": True}, timeout=10)
        job = Job(cluster, name, ["--stages", "pipeline", f"out={out}", *COMMON, *SAMPLING])
        lost = None
        if kill_after is not None:
            _, seen = job.wait_for(ENGINE_BATCH, kill_after, deadline)
            cluster.kill_raylet("node_b")
            killed = time.monotonic()
            cluster.wait_for({"node_b": False}, timeout=30)
            detected = time.monotonic() - killed
            replacement = cluster.add_worker("node_c", 3)
            lost = {"killed_after_engine_batches": kill_after, "detected_s": round(detected, 1),
                    "replacement_up_s": round(time.monotonic() - killed, 1), "replacement": replacement}
        status, logs = job.finish(deadline)
        result = {"status": status, "nodes": ids, "loss": lost}
        if status != "SUCCEEDED":
            return {**result, "log_tail": logs[-3000:]}
        summary = io.read_json(f"{out}/summary.json")
        found = confidence_ids(out)
        # The work redone shows as pipeline seconds against the baseline's: the job log cannot count engine
        # batches (Ray folds identical log lines of different workers into one "[repeated Nx across cluster]").
        return {**result, "pipeline_seconds": summary["seconds"], "questions": summary["questions"],
                "every_question_once": len(found) == len(set(found)) == summary["rows_accepted"],
                "questions_by_node": summary["questions_by_node"],
                "sampling_nodes_lost": summary["sampling_nodes_lost"]}


def training_run(bucket: str, deadline: float, kill_at_step: int = 5) -> dict:
    out = f"{bucket}/training"
    with new_cluster() as cluster:
        ids = cluster.wait_for({"node_a": True, "node_b": True}, timeout=10)
        job = Job(cluster, "training", ["--stages", "pipeline,train", f"out={out}", *COMMON, *TRAINING])
        text, _ = job.wait_for(TRAIN_STEP, kill_at_step, deadline)
        steps_seen = [int(s) for s in TRAIN_STEP.findall(text)]
        cluster.kill_raylet("node_b")
        killed = time.monotonic()
        cluster.wait_for({"node_b": False}, timeout=30)
        detected = time.monotonic() - killed
        replacement = cluster.add_worker("node_c", 3)
        replacement_up = time.monotonic() - killed
        text, regrouped = job.wait_for(WORKER_GROUP, 2, deadline)
        before = len(TRAIN_STEP.findall(text))
        text, resumed = job.wait_for(TRAIN_STEP, before + 1, deadline)
        status, logs = job.finish(deadline)
        result = {"status": status, "nodes": {**ids, "node_c": replacement}, "killed_at_step": max(steps_seen),
                  "detected_s": round(detected, 1), "replacement_up_s": round(replacement_up, 1), "worker_group_restarted_s": round(regrouped - killed, 1),
                  "first_step_after_kill_s": round(resumed - killed, 1)}
        if status != "SUCCEEDED":
            return {**result, "log_tail": logs[-3000:]}
        train = io.read_json(f"{out}/stages/train.json")["summary"]
        resumed_from = train["starts"][-1]
        return {**result, "starts": train["starts"], "attempts": train["attempts"], "steps": train["steps"],
                "steps_redone": max(steps_seen) - resumed_from, "worker_nodes": train["worker_nodes"],
                "checkpoint": train["checkpoint"], "train_seconds": train["seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="sampling,training")
    parser.add_argument("--time-limit", type=float, default=1500, help="seconds per run")
    parser.add_argument("--out", default="runs/node_loss.json")
    args = parser.parse_args(argv)
    report = {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} CPUs",
              "command": " ".join([Path(sys.executable).name, *sys.argv])}
    with tempfile.TemporaryDirectory() as scratch, local_s3(scratch) as bucket:
        for phase in args.phases.split(","):
            started = time.monotonic()
            if phase == "sampling":
                report["sampling_baseline"] = sampling_run(bucket, "sampling-baseline", None,
                                                           time.monotonic() + args.time_limit)
                report["sampling_node_lost"] = sampling_run(bucket, "sampling-lost", 6,
                                                            time.monotonic() + args.time_limit)
            elif phase == "training":
                report["training_node_lost"] = training_run(bucket, time.monotonic() + args.time_limit)
            else:
                parser.error(f"unknown phase {phase!r}")
            print(f"{phase}: {time.monotonic() - started:.0f} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
