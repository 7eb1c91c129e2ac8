"""A watchdog that kills the processes an engine started when its owner dies.

vLLM's async engine runs its core in a child process. When the Serve replica that owns it is killed (an OOM kill,
ray.kill, a crash), nothing stops that child: it keeps its memory and its cores beside the replica Serve starts in
its place (Ray only reaps such children with RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper, off by
default). So the engine starts this watchdog in a session of its own, naming its owner and the children to reap.

    python -m safeconf.engines.reaper OWNER_PID '[[pid, create_time], ...]'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def watch(owner_pid: int) -> subprocess.Popen:
    """Start the watchdog for the children `owner_pid` has now (each named by pid and start time, so a reused pid
    is never killed)."""
    import psutil

    children = [[p.pid, p.create_time()] for p in psutil.Process(owner_pid).children(recursive=True)]
    return subprocess.Popen([sys.executable, "-m", "safeconf.engines.reaper", str(owner_pid), json.dumps(children)],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True)


def reap(owner_pid: int, children: list[list]) -> int:
    """Wait for the owner to end, then kill those of its children that still run; returns how many were killed."""
    import psutil

    try:
        psutil.Process(owner_pid).wait()
    except psutil.NoSuchProcess:
        pass
    killed = 0
    for pid, started in children:
        try:
            child = psutil.Process(pid)
            if abs(child.create_time() - started) < 1e-3:
                child.kill()
                killed += 1
        except psutil.NoSuchProcess:
            continue
    return killed


if __name__ == "__main__":
    os.nice(5)  # it only waits
    reap(int(sys.argv[1]), json.loads(sys.argv[2]))
