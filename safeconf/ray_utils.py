"""What the pipeline, the evaluation, batch judging, training and serving share about Ray: joining the cluster,
and the engine actor pool (a Ray Data actor pool of engine stages, its resources and the placement groups of
tensor-parallel engines, freed when the stage ends)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
import time

import pyarrow as pa

from safeconf.config import Config, EngineConfig
from safeconf.engines.base import engine_runtime_env, placement_bundles


# Logical CPUs of the light tasks around the engines (rule mutations, confidence, writing). At Ray's default of one
# CPU each, the engine's CPU and the mutation's left the write no budget on a 2-CPU node: Ray Data ran the mutation
# over the whole input before writing a block, and every engine output waited in the object store, its bookkeeping on
# the driver (1M questions: 3.0x the driver's memory at 10k; BENCHMARKS.md, "The pipeline workload").
LIGHT_TASK_CPUS = 0.25

# Ray returns a task's result inline to its owner when it is at most max_direct_call_object_size (100 KiB by
# default), and the owner of Ray Data's blocks is the driver: a block of 256 short questions (~66 KB) waiting between
# stages sat in the driver's heap instead of the object store. Reading runs ahead of the engines, so at 1M questions
# the driver held ~250 MB of them (BENCHMARKS.md, "The pipeline workload"). At 8 KiB, blocks go to the object store
# (shared memory, spilled to disk when full) and only task metadata stays inline. Set for the Ray that init_ray starts
# and by the cluster files (cluster/*.yaml); a cluster started otherwise keeps Ray's default.
INLINE_RETURN_LIMIT_BYTES = 8 * 1024
INLINE_RETURN_LIMIT_ENV = "RAY_max_direct_call_object_size"


def init_ray(address: str = "") -> None:
    import ray

    if not ray.is_initialized():
        # read by the processes of a Ray this call starts (they inherit the environment); a user's setting wins
        os.environ.setdefault(INLINE_RETURN_LIMIT_ENV, str(INLINE_RETURN_LIMIT_BYTES))
        ray.init(address=address or None, log_to_driver=True)
    trim_heap_periodically()


_trimmer: threading.Thread | None = None


def release_freed_heap() -> bool:
    """Hand the heap memory this process has freed back to the OS (glibc's malloc_trim); False where the C library
    has no malloc_trim (it is glibc's)."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))


def trim_heap_periodically(interval_s: float = 10.0) -> None:
    """Release the driver's freed heap every `interval_s` seconds, on a daemon thread started once per process. A
    streaming run's driver allocates and frees for every block (Ray's core worker threads, Arrow, Python) and glibc
    keeps the freed pages: after a 40k-question pipeline one release gave back 12 of the 14 MB its driver held above
    a 10k one (BENCHMARKS.md, "The pipeline workload"; the main cause of that growth was a starved write, see
    LIGHT_TASK_CPUS)."""
    global _trimmer
    if _trimmer is not None or not release_freed_heap():
        return

    def trim() -> None:
        while True:
            time.sleep(interval_s)
            release_freed_heap()

    _trimmer = threading.Thread(target=trim, name="safeconf-heap-trim", daemon=True)
    _trimmer.start()


def question_dataset(questions: pa.Table, batch_size: int):
    """A Ray Dataset of questions in blocks of one engine batch, so actors pick up work as they free up."""
    import ray

    return ray.data.from_arrow([questions.slice(i, batch_size) for i in range(0, max(questions.num_rows, 1), batch_size)])


def map_on_engines(ds, stage_class, config: Config, placement: "EnginePlacementGroups | None" = None,
                   **constructor_kwargs):
    """`ds.map_batches` on an actor pool of `stage_class` (each actor holds one engine), sized by the config. With
    tensor parallelism each actor gets a placement group from `placement`, which the caller removes when the stage
    ends (EnginePlacementGroups)."""
    import ray

    engine = config.engine
    tensor_parallel = {}
    if placement_bundles(engine):  # one placement group per engine actor, made when Ray Data starts it
        if placement is None:
            raise ValueError("tensor-parallel engines need an EnginePlacementGroups, removed when the stage ends")
        tensor_parallel = {"ray_remote_args_fn": placement}
    mapped = ds.map_batches(
        stage_class,
        fn_constructor_kwargs={"config": config.to_dict(), **constructor_kwargs},
        # a fixed pool, or an autoscaling one (engine.concurrency MIN-MAX): Ray Data adds actors while batches
        # wait, and Ray places them on whatever nodes have room, the ones an autoscaler adds included
        compute=ray.data.ActorPoolStrategy(min_size=engine.pool[0], max_size=engine.pool[1]),
        batch_size=engine.batch_size,
        batch_format="pyarrow",
        **engine_actor_resources(engine),
        runtime_env=engine_runtime_env(engine),
        # A dead actor process (OOM kill, segfault, lost node) is restarted and the batch it held is retried on it;
        # the downstream write sees that batch's output once. Ray Data's default is unbounded (-1 both), so a batch
        # that kills every actor would loop forever: past the bound the run fails with Ray's ActorDiedError,
        # naming the stage's actor (MapWorker(MapBatches(<stage>))).
        # Ray 2.60 has no named parameter for these yet and warns that **ray_remote_args is deprecated (2.64).
        max_restarts=engine.max_restarts,
        max_task_retries=engine.max_restarts,
        **tensor_parallel,
    )
    # Bounded: actors asking for what no node has (a GPU bundle on a CPU cluster) fail the stage instead of waiting.
    # Later datasets built on this one carry its context, so the write that runs the stage sees it.
    mapped.context.wait_for_min_actors_s = engine.start_timeout_s or -1
    if engine.pool[0] < engine.pool[1]:
        # An autoscaling pool must be free to take the nodes that join. Ray Data's per-operator reservation splits
        # the cluster between the light task operators around the engines and the engines, and the pool's share
        # stays below a second engine however many nodes join (measured on the loopback cluster: "exceeded
        # resource limits" until the end, every batch on the first node). Without it the pool grows onto them.
        mapped.context.op_resource_reservation_enabled = False
    return mapped


def engine_actor_resources(engine) -> dict:
    """What one engine actor of map_on_engines reserves, as Ray remote args. With tensor parallelism its GPUs are
    in its placement group's bundles (placement_bundles), not on the actor. safeconf.cluster_check reads this."""
    return {"num_cpus": engine.num_cpus, "num_gpus": 0 if placement_bundles(engine) else engine.num_gpus,
            "memory": int(engine.memory_gib * 1024**3) or None}


class EnginePlacementGroups:
    """The placement groups of one stage's tensor-parallel engine actors: Ray Data calls this (ray_remote_args_fn)
    as it starts each actor, and gets a fresh group (see placement_bundles) whose child tasks and actors, vLLM's GPU
    workers, stay inside it. STRICT_PACK: an engine's CPU bundle and its GPU bundles on one node (PACK could put the
    actor on a node without a GPU). The groups belong to the driver and would outlive the stage, holding their GPUs
    through training and evaluation: `remove` (engine_actors does, when the stage ends) frees them."""

    def __init__(self, bundles: list[dict] | None):
        self.bundles = bundles
        self.groups = []

    def __call__(self) -> dict:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group(self.bundles, strategy="STRICT_PACK")
        self.groups.append(group)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        while self.groups:
            remove_placement_group(self.groups.pop())


@contextlib.contextmanager
def engine_actors(engine: EngineConfig):
    """One stage's engine actor pool: yields the EnginePlacementGroups for map_on_engines and removes them when the
    stage ends; Ray Data's start timeout becomes an error naming the setting, what one engine asks for and what the
    cluster has."""
    placement = EnginePlacementGroups(placement_bundles(engine))
    try:
        yield placement
    except Exception as error:
        if "Timed out while starting actors" not in str(error):
            raise
        raise RuntimeError(start_timeout_message(engine)) from error
    finally:
        placement.remove()


def start_timeout_message(engine: EngineConfig) -> str:
    import ray

    asks = {k: v for k, v in engine_actor_resources(engine).items() if v}
    bundles = placement_bundles(engine)
    has = {k: ray.cluster_resources().get(k, 0) for k in ("CPU", "GPU", "memory")}
    free = {k: ray.available_resources().get(k, 0) for k in ("CPU", "GPU", "memory")}
    return (f"Timed out while starting actors: {engine.pool[0]} engine actor(s) not started within "
            f"engine.start_timeout_s={engine.start_timeout_s:g} s. Each asks for {asks}"
            + (f" in a placement group of {bundles}" if bundles else "")
            + f"; the cluster has {has} in all, {free} free now. A fresh autoscaling cluster must boot GPU nodes, pull "
            "the image, run setup_commands, download the weights and start vLLM within this window: raise "
            "engine.start_timeout_s (the 7B/8B configs use 3600), or fit engine.num_gpus / num_cpus / memory_gib "
            "to the node types (python -m safeconf.cluster_check CLUSTER CONFIG).")
