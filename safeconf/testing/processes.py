"""What a local Ray's processes use while a benchmark runs: this process (the driver) and its descendants (the
GCS, the raylet and the workers it starts), sampled on a thread. The benchmarks use it to split a steady state's
CPU by process (where the cores go besides the engine) and to report the workers' peak memory."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

DRIVER = "driver (this process)"


@dataclass(frozen=True)
class ProcessSample:
    title: str  # a Ray worker's process title names its actor or task, e.g. 'ray::MapWorker(MapBatches(EngineStage))'
    cpu_s: float  # user + system seconds since the process started
    peak_rss_bytes: int  # the kernel's high-water mark of its resident memory (VmHWM), so no peak falls between samples


def _title(process: psutil.Process) -> str:
    if process.pid == os.getpid():
        return DRIVER
    words = process.cmdline() or [process.name()]
    return words[0] if words[0].startswith("ray::") else " ".join(Path(w).name for w in words[:2])


def status_mb(pid: int | str = "self", keys: tuple[str, ...] = ("RssAnon", "RssFile", "RssShmem")) -> dict[str, float]:
    """Memory lines of /proc/PID/status in MB (Linux): by default the resident memory by kind, anonymous (the heap),
    file-backed and shared (the object store); VmHWM is the peak resident memory."""
    with open(f"/proc/{pid}/status") as status:
        return {key: round(int(value.split()[0]) / 1024, 1) for key, value in (line.split(":", 1) for line in status)
                if key in keys}


def _peak_rss(process: psutil.Process) -> int:
    try:
        return int(status_mb(process.pid, ("VmHWM",))["VmHWM"] * 2**20)
    except (OSError, KeyError):
        return process.memory_info().rss  # no /proc (not Linux): the RSS at the sample


class ProcessSampler:
    """Samples every `interval` seconds until stop(); use as a context manager. Every sample is kept only with
    `keep_samples` (for cpu_between): a run of hours would otherwise grow the memory it measures."""

    def __init__(self, interval: float = 0.5, keep_samples: bool = True):
        self.interval = interval
        self.keep_samples = keep_samples
        self.samples: list[tuple[float, dict[int, ProcessSample]]] = []
        self.peaks: dict[int, ProcessSample] = {}  # per process, its last sample (which holds its peak RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while True:
            found = {}
            for process in [me, *me.children(recursive=True)]:
                try:
                    with process.oneshot():
                        times = process.cpu_times()
                        found[process.pid] = ProcessSample(_title(process), times.user + times.system,
                                                           _peak_rss(process))
                except psutil.Error:
                    continue  # ended between listing and reading
            self.peaks.update(found)
            if self.keep_samples:
                self.samples.append((time.time(), found))
            if self._stop.wait(self.interval):
                return

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per process title (summed over its processes), from the last sample at or before `start` to
        the first at or after `end`, most first; a process started inside the span counts from its start, one that
        ended inside it is left out."""
        before = max((s for s in self.samples if s[0] <= start), key=lambda s: s[0], default=self.samples[0])[1]
        after = min((s for s in self.samples if s[0] >= end), key=lambda s: s[0], default=self.samples[-1])[1]
        used: dict[str, float] = {}
        for pid, sample in after.items():
            earlier = before.get(pid)
            used[sample.title] = used.get(sample.title, 0.0) + sample.cpu_s - (earlier.cpu_s if earlier else 0.0)
        return {title: round(s, 2) for title, s in sorted(used.items(), key=lambda kv: -kv[1]) if s >= 0.05}

    def peak_rss_mb(self, title_prefix: str = "ray::") -> float:
        """The highest peak RSS of any one sampled process whose title starts with `title_prefix` (Ray's workers by
        default), in MB; 0 where none was seen."""
        peaks = [p.peak_rss_bytes for p in self.peaks.values() if p.title.startswith(title_prefix)]
        return round(max(peaks, default=0) / 2**20, 1)
