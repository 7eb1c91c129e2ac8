"""safeconf.testing.processes: the benchmarks' split of CPU by process and the workers' peak memory."""

import subprocess
import sys
import time

from safeconf.testing.processes import DRIVER, ProcessSampler


def test_sampler_splits_cpu_by_process_and_reads_peak_memory():
    # A child that spins for 1.5 s holding ~64 MB, titled like a Ray worker (argv[0], as Ray's process titles are).
    child = subprocess.Popen(["ray::Spinner", "-c", "import time; x = bytearray(64 * 2**20); end = time.time() + 1.5\n"
                              "while time.time() < end: pass"], executable=sys.executable)
    with ProcessSampler(interval=0.1) as sampler:
        start = time.time()
        child.wait()
        end = time.time()
        time.sleep(0.05)
    # The child ended inside the span, so its last sample is read with end = its last sample's time.
    last_seen = max(t for t, found in sampler.samples if child.pid in found)
    used = sampler.cpu_between(start, last_seen)
    assert used["ray::Spinner"] > 0.5, used  # it spun for most of its 1.5 s
    assert used.get(DRIVER, 0.0) < used["ray::Spinner"]  # the waiting driver used little
    assert end - start >= 1.4
    assert sampler.peak_rss_mb() >= 60  # Ray's workers by default; the kernel's high-water mark holds the 64 MB
    assert sampler.peak_rss_mb(title_prefix="no such process") == 0
