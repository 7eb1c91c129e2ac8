"""The driver's heap does not grow with a streaming run's blocks (safeconf.ray_utils): it returns the heap it has
freed to the OS, and the blocks waiting between stages live in the object store, not inline in the driver."""

import json
import subprocess
import sys
import textwrap
import threading

import pytest

from safeconf.ray_utils import INLINE_RETURN_LIMIT_ENV, release_freed_heap, trim_heap_periodically

# In a process of its own, so no trimming thread of this one (init_ray starts one) frees the pages mid-measurement.
FRAGMENT_THEN_RELEASE = textwrap.dedent("""
    import json
    from safeconf.ray_utils import release_freed_heap
    from safeconf.testing.processes import status_mb

    def resident_anonymous_mb():
        return status_mb()["RssAnon"]

    # 160 MB in 8 KB blocks (below glibc's mmap threshold, so on the heap), then every block freed but one in 64:
    # the kept ones pin the heap's top, so glibc cannot shrink it and keeps the freed pages resident.
    blocks = [bytearray(8192) for _ in range(20_000)]
    kept = blocks[::64]
    del blocks
    before = resident_anonymous_mb()
    released = release_freed_heap()
    print(json.dumps({"released": released, "before": before, "after": resident_anonymous_mb(), "kept": len(kept)}))
""")


def test_freed_heap_goes_back_to_the_os():
    if not release_freed_heap():
        pytest.skip("the C library has no malloc_trim (not glibc)")
    found = json.loads(subprocess.run([sys.executable, "-c", FRAGMENT_THEN_RELEASE], capture_output=True, text=True,
                                      check=True).stdout)
    assert found["released"] and found["kept"] == 313
    assert found["before"] - found["after"] > 100, found  # most of the ~157 MB freed is handed back


def test_the_trimming_thread_starts_once_per_process():
    trim_heap_periodically(interval_s=60)
    trim_heap_periodically(interval_s=60)
    assert [t.name for t in threading.enumerate()].count("safeconf-heap-trim") == (1 if release_freed_heap() else 0)


# A task's 60 KB result (a block of ~230 short questions), in a Ray of its own: started by init_ray, or by a plain
# ray.init with Ray's defaults. Where the result lives: in the object store (node_ids) or inline in its owner's heap.
WHERE_A_BLOCK_LIVES = textwrap.dedent("""
    import json, sys, time
    import ray
    from safeconf.ray_utils import init_ray

    if sys.argv[1] == "init_ray":
        init_ray("local")
    else:
        ray.init(address="local")

    @ray.remote
    def block():
        return b"x" * 60_000

    ref = block.remote()
    ray.get(ref)
    # the owner learns of a copy in the object store a little after the result (location updates are batched)
    for _ in range(50):
        where = ray.experimental.get_object_locations([ref])[ref]
        if where["node_ids"]:
            break
        time.sleep(0.1)
    print("WHERE " + json.dumps(where))
    ray.shutdown()
""")


def _where_a_block_lives(*hows: str) -> list[dict]:
    """WHERE_A_BLOCK_LIVES in a process and a Ray of its own for each of `hows`, side by side."""
    import os
    import shutil
    import tempfile

    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", INLINE_RETURN_LIMIT_ENV)}
    ray_dirs = [tempfile.mkdtemp(prefix="wb-", dir="/tmp") for _ in hows]  # Ray's socket paths: under 107 bytes
    try:
        runs = [subprocess.Popen([sys.executable, "-c", WHERE_A_BLOCK_LIVES, how], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env={**env, "RAY_TMPDIR": ray_dir})
                for how, ray_dir in zip(hows, ray_dirs)]
        outputs = [run.communicate(timeout=300) for run in runs]
    finally:
        for ray_dir in ray_dirs:
            shutil.rmtree(ray_dir, ignore_errors=True)
    found = []
    for run, (stdout, stderr) in zip(runs, outputs):
        lines = [line for line in stdout.splitlines() if line.startswith("WHERE ")]
        assert run.returncode == 0 and lines, stdout[-2000:] + stderr[-3000:]
        found.append(json.loads(lines[-1][len("WHERE "):]))
    return found


@pytest.mark.slow
def test_blocks_of_short_questions_live_in_the_object_store_not_the_drivers_heap():
    """Ray keeps a result under its inline limit (100 KiB) in the heap of its owner, the driver for Ray Data's
    blocks; init_ray lowers the limit so that blocks waiting between stages go to the object store."""
    with_init_ray, with_defaults = _where_a_block_lives("init_ray", "default")
    assert with_init_ray["node_ids"]  # in a node's object store
    assert not with_defaults["node_ids"]  # Ray's default: inline, in the driver's heap
