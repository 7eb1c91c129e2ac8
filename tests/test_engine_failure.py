"""A killed engine actor loses nothing. The pipeline's engine actor is SIGKILLed (by its pid, found through Ray's
state API) after its first batch reached the output and while batches remain: Ray restarts it, the batch it held
is retried on it, and the confidence table still has every question once with all its samples. A stage that
kills every actor fails after engine.max_restarts restarts, naming the stage, instead of looping.

Each run is a subprocess with its own Ray (own temp dir; the dashboard on, which the state API needs), so it never
meets the session's Ray of the other tests."""

import json
import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

RAY = """
import json, os, signal, sys, tempfile, threading, time
from pathlib import Path
import ray
ray.init(address="local", num_cpus=4, include_dashboard=True, _temp_dir=tempfile.mkdtemp(prefix="rk", dir="/tmp"),
         object_store_memory=512 * 1024**2, log_to_driver=False)
"""

KILL_SCRIPT = RAY + textwrap.dedent(
    """
    from ray.util.state import list_actors
    from safeconf.config import load_config
    from safeconf.pipeline import run_pipeline

    out = Path(sys.argv[1])
    config = load_config(overrides=sys.argv[2:] + [f"out={out}"])
    ENGINE_ACTOR = [("class_name", "=", "MapWorker(MapBatches(EngineStage))")]
    # this Ray's own address: without it the state API refuses when other Rays run on the machine
    ADDRESS = ray.get_runtime_context().gcs_address
    kill = {}

    def killer():  # after the first batch is written, while others remain: mid-run
        try:
            while not list((out / "confidence").glob("*.parquet")):
                time.sleep(0.1)
            alive = [a for a in list_actors(address=ADDRESS, filters=ENGINE_ACTOR) if a.state == "ALIVE"]
            kill.update(actor_id=alive[0].actor_id, pid=alive[0].pid,
                        files_written=len(list((out / "confidence").glob("*.parquet"))))
            os.kill(alive[0].pid, signal.SIGKILL)
        except Exception as error:  # reported in the result, so the test names why no kill happened
            kill["error"] = repr(error)

    threading.Thread(target=killer, daemon=True).start()
    started = time.time()
    summary = run_pipeline(config)
    actors = [{"actor_id": a.actor_id, "pid": a.pid, "num_restarts": a.num_restarts}
              for a in list_actors(address=ADDRESS, filters=ENGINE_ACTOR, detail=True)]
    print("RESULT " + json.dumps({"kill": kill, "actors": actors, "seconds": time.time() - started,
                                  "summary": {k: v for k, v in summary.items() if k != "config"}}))
    """
)

CRASH_LOOP_SCRIPT = RAY + textwrap.dedent(
    """
    import pyarrow as pa
    from safeconf.config import load_config
    from safeconf.ray_utils import map_on_engines

    attempts = Path(sys.argv[1])

    class CrashingStage:  # every batch kills its actor's process, as an OOM on a poison batch would
        def __init__(self, config):
            pass

        def __call__(self, batch):
            with attempts.open("a") as f:
                f.write(f"{os.getpid()}\\n")
            os._exit(1)

    config = load_config(overrides=["engine.max_restarts=1", "engine.batch_size=2", "engine.memory_gib=0"])
    ds = map_on_engines(ray.data.from_arrow(pa.table({"id": ["a", "b"]})), CrashingStage, config)
    try:
        ds.take_all()
        print("RESULT " + json.dumps({"error": None}))
    except ray.exceptions.ActorDiedError as error:
        print("RESULT " + json.dumps({"error": str(error)}))
    """
)


def run_script(script: str, *args: str, timeout: int) -> dict:
    run = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, run.stdout[-2000:] + run.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_killed_engine_actor_is_restarted_and_its_batch_retried_once(tmp_path):
    k, variants = 2, 2
    out = tmp_path / "run"
    result = run_script(
        KILL_SCRIPT, str(out), "data=embedded", "limit=12", "engine.kind=hf", "engine.batch_size=4",
        f"sampling.k={k}", "sampling.max_tokens=8", f"mutation.variants_per_question={variants}",
        "mutation.operators=[shuffle,relabel,framing]", timeout=420,  # the limit only stops a hang; ~2 min alone
    )
    kill, summary = result["kill"], result["summary"]

    # the kill happened mid-run and Ray restarted that very actor in a new process
    assert kill and "error" not in kill, f"the engine actor was never killed: {kill}"
    assert kill["files_written"] < 3, f"killed after the last batch: {kill}"
    (actor,) = [a for a in result["actors"] if a["actor_id"] == kill["actor_id"]]
    assert actor["num_restarts"] == 1 and actor["pid"] != kill["pid"], (kill, result["actors"])

    # every accepted question exactly once, each variant slot once, every variant with exactly k samples
    rows = pq.read_table(out / "confidence").to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == summary["rows_accepted"]
    assert summary["rows_read"] == 12 == summary["rows_accepted"] + summary["rows_rejected"]
    for row in rows:
        variant_ids = [v["variant_id"] for v in row["variants"]]
        assert len(variant_ids) == len(set(variant_ids)), row["id"]
        assert len(row["variants"]) - 1 + len(row["dropped"]) == variants, row["id"]
        assert all(len(v["samples"]) == k for v in row["variants"]), row["id"]
        assert row["num_samples"] == k * len(row["variants"])

    # the summary agrees with the table it describes
    assert summary["questions"] == len(rows)
    assert summary["samples"] == sum(len(v["samples"]) for r in rows for v in r["variants"])
    assert sum(summary["variants_by_mutation"].values()) == sum(len(r["variants"]) for r in rows)


def test_an_engine_stage_that_kills_every_actor_fails_naming_the_stage(tmp_path):
    attempts = tmp_path / "attempts"
    result = run_script(CRASH_LOOP_SCRIPT, str(attempts), timeout=180)

    assert result["error"] is not None, "a batch that kills every actor must fail the run"
    assert "MapBatches(CrashingStage)" in result["error"]
    pids = attempts.read_text().split()
    assert len(pids) == 2 == len(set(pids))  # the first try and engine.max_restarts=1 retry, each in a new process


UNPLACEABLE_SCRIPT = RAY + textwrap.dedent(
    """
    import pyarrow as pa
    from safeconf.config import load_config
    from safeconf.ray_utils import engine_actors, map_on_engines

    # a GPU engine on a CPU-only cluster: no node can ever hold the actor
    config = load_config(overrides=["engine.num_gpus=1", "engine.start_timeout_s=3", "engine.memory_gib=0"])
    started = time.time()
    try:
        with engine_actors(config.engine) as placement:
            map_on_engines(ray.data.from_arrow(pa.table({"id": ["a"]})), object, config, placement).take_all()
        print("RESULT " + json.dumps({"error": None}))
    except Exception as error:
        print("RESULT " + json.dumps({"error": f"{type(error).__name__}: {error}"[:2000],
                                      "seconds": time.time() - started}))
    """
)


def test_an_engine_stage_no_node_can_place_fails_within_its_start_timeout():
    result = run_script(UNPLACEABLE_SCRIPT, timeout=300)
    assert result["error"] is not None, "a stage that cannot be placed must fail, not wait"
    assert "Timed out while starting actors" in result["error"], result
    # what to change, what one engine asks for and what the cluster has
    assert "engine.start_timeout_s=3 s" in result["error"] and "'num_gpus': 1.0" in result["error"], result
    assert "the cluster has {'CPU': " in result["error"] and "'GPU': 0" in result["error"], result
    assert result["seconds"] < 60, result
