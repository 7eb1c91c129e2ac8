"""The driver returns the heap it has freed to the OS (safeconf.ray_utils): without it, a streaming run's driver
kept every page it had freed and its resident memory grew with the blocks of a run."""

import json
import subprocess
import sys
import textwrap
import threading

import pytest

from safeconf.ray_utils import release_freed_heap, trim_heap_periodically

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
