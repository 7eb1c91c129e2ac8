"""Tensor-parallel engines reserve their GPUs once: the engine actor sits in a placement group whose GPU bundles
vLLM's per-GPU Ray workers fill. Checked on a Ray with two logical GPUs (no real GPU needed): a stand-in engine
starts two 1-GPU child actors the way vLLM's Ray executor does; if the engine actor also reserved the GPUs, the
children could never be placed and the run would hang."""

import subprocess
import sys
import textwrap

import pytest

from safeconf.config import EngineConfig
from safeconf.engines.base import placement_bundles

SCRIPT = textwrap.dedent(
    """
    import sys, tempfile
    import ray
    from safeconf.config import load_config
    from ray.util import placement_group_table
    from safeconf.ray_utils import engine_actors, map_on_engines

    @ray.remote(num_gpus=1, num_cpus=0)
    class GpuWorker:  # what vLLM's Ray executor starts: one actor per GPU, no CPU
        def gpu(self):
            return ray.get_gpu_ids()[0]

    class TensorParallelStage:
        def __init__(self, config):
            tp = config["engine"]["tensor_parallel_size"]
            self.workers = [GpuWorker.remote() for _ in range(tp)]
            self.gpus = sorted(str(g) for g in ray.get([w.gpu.remote() for w in self.workers], timeout=60))

        def __call__(self, batch):
            return {"id": batch["id"], "gpus": [",".join(self.gpus)] * len(batch["id"])}

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(),
             log_to_driver=False)
    config = load_config(overrides=["engine.tensor_parallel_size=2", "engine.num_cpus=1", "engine.concurrency=1",
                                    "engine.batch_size=2"])
    with engine_actors(config.engine) as placement:
        rows = map_on_engines(ray.data.range(4), TensorParallelStage, config, placement).take_all()
        groups = list(placement.groups)
        print("STRATEGIES", sorted({placement_group_table(g)["strategy"] for g in groups}))
    print("GPUS", sorted({r["gpus"] for r in rows}))
    # the stage is over: its groups are gone and the next stage can have the GPUs
    print("STATES", sorted({placement_group_table(g)["state"] for g in groups}))
    """
)


def test_bundles_of_a_tensor_parallel_engine():
    assert placement_bundles(EngineConfig(tensor_parallel_size=1, num_gpus=1)) is None
    bundles = placement_bundles(EngineConfig(tensor_parallel_size=2, num_cpus=4, memory_gib=2))
    assert bundles == [{"CPU": 4, "memory": 2 * 1024**3}, {"GPU": 1}, {"GPU": 1}]


@pytest.mark.slow
def test_tensor_parallel_engine_actor_leaves_its_gpus_to_the_workers():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "GPUS ['0,1']" in run.stdout, run.stdout[-2000:]
    assert "STRATEGIES ['STRICT_PACK']" in run.stdout  # the engine's CPU bundle on the node of its GPUs
    assert "STATES ['REMOVED']" in run.stdout, run.stdout[-2000:]  # every group Ray Data asked for


def test_tensor_parallel_engines_without_a_placement_owner_are_refused():
    import ray

    from safeconf.config import load_config
    from safeconf.ray_utils import map_on_engines

    config = load_config(overrides=["engine.tensor_parallel_size=2"])
    with pytest.raises(ValueError, match="need an EnginePlacementGroups"):
        map_on_engines(ray.data, object, config)


def test_engine_threads_come_from_the_engines_own_reservation_on_gpus():
    import os

    from safeconf.engines.base import engine_runtime_env

    def threads(**engine):
        return engine_runtime_env(EngineConfig(**engine))["env_vars"]["OMP_NUM_THREADS"]

    assert threads(num_gpus=1, num_cpus=4) == "4"  # not the node's (or the pod's host's) core count
    assert threads(tensor_parallel_size=2, num_cpus=6.5) == "6"
    assert threads(num_gpus=1, num_cpus=4, cpu_threads=2) == "2"  # said explicitly
    # a CPU engine is the heavy work of its node: every core, whatever its 1-CPU reservation
    assert threads(num_gpus=0, num_cpus=1) == str(len(os.sched_getaffinity(0)))
