"""A multi-node Ray cluster on one machine: a head and N worker nodes on 127.0.0.1, one `ray start` each.

    python -m safeconf.testing.local_cluster --workers 2 --cpus 2     # prints the address, serves until Ctrl-C

Every node is its own `ray start --block` process (its raylet, object store and agents, its own --temp-dir, free
ports, its own --num-cpus and a custom resource naming it: node_a, node_b, ...), as on separate machines; only the
network is loopback. ray.cluster_utils.Cluster does the same inside one Python process (ray._private.node.Node
objects); separate `ray start` processes are what a real cluster runs, and they can be stopped, or lose their
raylet, one at a time by their own process ids. Nothing here calls `ray stop` (it would stop every Ray on the
machine, e.g. a run in progress).

The cluster uses Ray token authentication with a token of its own (RAY_AUTH_TOKEN_PATH under its folder): clients
need LocalCluster.env (RAY_AUTH_MODE=token and that path) in their environment before Ray is imported, e.g.
`subprocess.run(..., env=cluster.env)`. Lives in the package (not under tests/) so that users can run it and the
tests import it the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from safeconf.ray_utils import INLINE_RETURN_LIMIT_BYTES, INLINE_RETURN_LIMIT_ENV

BIN = Path(sys.executable).parent
# GCS marks a node dead after health_check_failure_threshold missed checks; Ray's defaults take ~15-30 s to notice a
# lost raylet. Tests that kill a node use these (about 2 s).
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
                          "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
NODE_PORTS = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "runtime-env-agent-port"]
HEAD_PORTS = ["port", "ray-client-server-port", "dashboard-port"]

# Run in a child process with the cluster's env (the parent may hold another Ray, or none): the GCS's node table,
# polled until every node port in `want` has the wanted liveness or the timeout passes.
_NODE_TABLE = textwrap.dedent("""
    import json, sys, time
    from ray._raylet import GcsClient
    address, want, timeout = sys.argv[1], {int(k): v for k, v in json.loads(sys.argv[2]).items()}, float(sys.argv[3])
    deadline = time.monotonic() + timeout
    client = GcsClient(address=address)
    while True:
        table = [{"node_id": node_id.hex(), "port": info.node_manager_port, "alive": info.state == 0,
                  "resources": dict(info.resources_total), "is_head": info.is_head_node}
                 for node_id, info in client.get_all_node_info(timeout=max(1.0, deadline - time.monotonic())).items()]
        alive = {row["port"]: row["alive"] for row in table if row["alive"]}
        dead = {row["port"]: False for row in table if not row["alive"] and row["port"] not in alive}
        seen = {**dead, **alive}
        met = all(seen.get(port, False) == state for port, state in want.items())
        if met or time.monotonic() > deadline:
            print("NODE_TABLE " + json.dumps(table), flush=True)  # other lines may reach stdout too
            sys.exit(0 if met else 3)
        time.sleep(0.25)
""")


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, all different, below the kernel's ephemeral range and above Ray's default
    worker ports (10002-19999): a port the OS hands out for bind(0) or an outgoing connection (as every Ray process
    on the machine does all the time) could be taken again between this choice and `ray start`'s bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = low if low > 21000 else 65536  # an odd range: fall back to ports from the OS
    candidates = random.sample(range(20000, low), min(low - 20000, 4 * count + 64)) if low < 65536 else []
    chosen, held = [], []
    try:
        for port in candidates + [0] * count:
            if len(chosen) == count:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            chosen.append(sock.getsockname()[1])
        return chosen
    finally:
        for sock in held:
            sock.close()


@dataclass
class LocalNode:
    name: str  # "head" or the worker's custom resource (node_a, ...)
    num_cpus: int
    temp_dir: Path
    ports: dict[str, int]
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every process of this node seen so far
    num_gpus: int = 0  # logical GPUs: Ray schedules them, no device behind them

    @property
    def node_manager_port(self) -> int:
        return self.ports["node-manager-port"]

    def processes(self) -> list[psutil.Process]:
        """The node's live processes: its `ray start`, the raylet and GCS under it, and their workers."""
        found = []
        if self.process is not None and self.process.poll() is None:
            try:
                root = psutil.Process(self.process.pid)
                found = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in found:
            self.seen.setdefault(proc.pid, proc)
        return found

    def pid_of(self, name: str) -> int:
        """Pid of the node's process called `name` (raylet, gcs_server)."""
        for proc in self.processes():
            try:
                if proc.name() == name:
                    return proc.pid
            except psutil.NoSuchProcess:
                continue
        raise LookupError(f"node {self.name}: no live {name} process (see {self.log_path})")


class LocalCluster:
    """A head and worker nodes on loopback. `workers`: {resource name: CPUs}, e.g. {"node_a": 1, "node_b": 2}.
    `gpus`: {resource name: logical GPUs} (`ray start --num-gpus`: GPU resources with no device, for checking
    GPU placement on a machine without GPUs)."""

    def __init__(self, workers: dict[str, int], head_cpus: int = 0, root: str | Path | None = None,
                 include_dashboard: bool = False, system_config: dict | None = None,
                 object_store_mib: int = 128, keep_logs: bool = False, gpus: dict[str, int] | None = None):
        # Socket paths under a temp dir may not exceed 107 bytes: keep the folder short.
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="scl-", dir="/tmp"))
        self._made_root = root is None
        self.include_dashboard = include_dashboard
        self.system_config = system_config
        self.object_store_mib = object_store_mib
        self.keep_logs = keep_logs
        names = ["head", *workers]
        if len(set(names)) != len(names) or "head" in workers:
            raise ValueError(f"worker names must be unique and not 'head': {list(workers)}")
        ports = iter(free_ports(len(HEAD_PORTS) + len(NODE_PORTS) * len(names)))
        self.nodes: dict[str, LocalNode] = {}
        for name, cpus in {"head": head_cpus, **workers}.items():
            wanted = NODE_PORTS + (HEAD_PORTS if name == "head" else [])
            self.nodes[name] = LocalNode(name, int(cpus), self.root / name, {key: next(ports) for key in wanted},
                                         num_gpus=int((gpus or {}).get(name, 0)))
        token_file = self.root / "auth_token"
        token_file.write_text(secrets.token_hex(32))
        token_file.chmod(0o600)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)  # a ray start must not join some other cluster
        self.env.setdefault(INLINE_RETURN_LIMIT_ENV, str(INLINE_RETURN_LIMIT_BYTES))  # as the cluster files start Ray

    # --- addresses ---

    @property
    def head(self) -> LocalNode:
        return self.nodes["head"]

    @property
    def address(self) -> str:
        """GCS address for ray.init(address=...) and `ray start --address`."""
        return f"127.0.0.1:{self.head.ports['port']}"

    @property
    def dashboard_url(self) -> str | None:
        """For `ray job submit --address` (with include_dashboard)."""
        return f"http://127.0.0.1:{self.head.ports['dashboard-port']}" if self.include_dashboard else None

    @property
    def workers(self) -> list[str]:
        return [name for name in self.nodes if name != "head"]

    # --- start and stop ---

    def _command(self, node: LocalNode) -> list[str]:
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={node.num_cpus}",
               f"--num-gpus={node.num_gpus}",
               f"--temp-dir={node.temp_dir}", f"--object-store-memory={self.object_store_mib * 1024**2}",
               "--min-worker-port=0", "--max-worker-port=0",  # workers bind random free ports
               "--disable-usage-stats", *(f"--{key}={port}" for key, port in node.ports.items()
                                          if key not in HEAD_PORTS or node.name == "head")]
        if node.name == "head":
            cmd[2:2] = ["--head"]
            cmd += [f"--include-dashboard={str(self.include_dashboard).lower()}", "--dashboard-host=127.0.0.1"]
            if self.system_config:
                cmd.append(f"--system-config={json.dumps(self.system_config)}")
        else:
            cmd += [f"--address={self.address}", f"--resources={json.dumps({node.name: 1})}"]
        return cmd

    def _launch(self, node: LocalNode) -> None:
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        node.log_path = self.root / f"{node.name}.log"
        with open(node.log_path, "wb") as log:
            # its own session: a Ctrl-C in the caller's terminal reaches the caller, which stops the nodes in order
            node.process = subprocess.Popen(self._command(node), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self, timeout: float = 120) -> "LocalCluster":
        """Start the head, then the workers together; return once every node is alive in the GCS's node table."""
        deadline = time.monotonic() + timeout
        try:
            self._launch(self.head)
            while not _accepts(self.head.ports["port"]):
                self._check_running(self.head)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the head's GCS did not listen on {self.address} within {timeout:.0f} s; "
                                       f"see {self.head.log_path}")
                time.sleep(0.2)
            self._check_running(self.head)  # the port answered: from this head, not some other process
            for name in self.workers:
                self._launch(self.nodes[name])
            self.wait_for({name: True for name in self.nodes}, timeout=max(1.0, deadline - time.monotonic()))
            for node in self.nodes.values():
                node.processes()  # remember every pid while all are up
        except BaseException:
            self.stop()
            raise
        return self

    def _check_running(self, node: LocalNode) -> None:
        if node.process is not None and node.process.poll() is not None:
            tail = node.log_path.read_text(errors="replace")[-3000:] if node.log_path else ""
            raise RuntimeError(f"`ray start` of node {node.name} exited with {node.process.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGKILL every process of every node (gcs_server and raylet ignore SIGTERM while busy), by pid."""
        procs = []
        for node in self.nodes.values():
            node.processes()
            procs += [p for p in node.seen.values() if _running(p)]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        for node in self.nodes.values():
            if node.process is not None:
                node.process.wait(timeout=30)
        if self._made_root and not self.keep_logs:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- nodes ---

    def add_worker(self, name: str, cpus: int, timeout: float = 120, gpus: int = 0) -> str:
        """Start one more worker node, as an autoscaler replaces a lost machine; returns its node id once alive."""
        if name in self.nodes:
            raise ValueError(f"node {name!r} exists already")
        node = LocalNode(name, int(cpus), self.root / name, dict(zip(NODE_PORTS, free_ports(len(NODE_PORTS)))),
                         num_gpus=int(gpus))
        self.nodes[name] = node
        self._launch(node)
        node_id = self.wait_for({name: True}, timeout=timeout)[name]
        node.processes()
        return node_id

    def kill_raylet(self, name: str) -> int:
        """SIGKILL the raylet of a node (a lost machine, as Ray sees it); returns its pid. Its `ray start --block`
        then stops the node's other processes; its workers exit when their raylet is gone."""
        node = self.nodes[name]
        node.processes()
        pid = node.pid_of("raylet")
        os.kill(pid, signal.SIGKILL)
        return pid

    def node_table(self, want: dict[str, bool] | None = None, timeout: float = 10) -> list[dict]:
        """The GCS's node table (node_id, port, alive, resources, is_head), read by a child process with this
        cluster's env; with `want` ({node name: alive}), polled until it holds, and TimeoutError when it does not
        within `timeout` seconds (bounded: never waits longer)."""
        want_ports = {str(self.nodes[name].node_manager_port): state for name, state in (want or {}).items()}
        run = subprocess.run([sys.executable, "-c", _NODE_TABLE, self.address, json.dumps(want_ports), str(timeout)],
                             env=self.env, capture_output=True, text=True, timeout=timeout + 60)
        if run.returncode not in (0, 3):
            raise RuntimeError(f"reading the node table of {self.address} failed ({run.returncode}):\n"
                               f"{run.stderr[-3000:]}")
        lines = [line for line in run.stdout.splitlines() if line.startswith("NODE_TABLE ")]
        if not lines:
            raise RuntimeError(f"reading the node table of {self.address} printed no table:\n{run.stderr[-3000:]}")
        table = json.loads(lines[-1].removeprefix("NODE_TABLE "))
        if run.returncode == 3:
            states = {self.name_of(row["port"]): row["alive"] for row in table}
            raise TimeoutError(f"nodes not as wanted after {timeout:.0f} s: wanted {want}, GCS says {states}")
        return table

    def wait_for(self, want: dict[str, bool], timeout: float = 60) -> dict[str, str]:
        """Wait (at most `timeout` s) until each named node is alive / dead; returns {name: node id}."""
        for name, alive in want.items():
            if alive:
                self._check_running(self.nodes[name])
        return {self.name_of(row["port"]): row["node_id"] for row in self.node_table(want, timeout)
                if self.name_of(row["port"]) in want}

    def name_of(self, node_manager_port: int) -> str:
        return next((n.name for n in self.nodes.values() if n.node_manager_port == node_manager_port),
                    f"port {node_manager_port}")


def submit_job(address: str, env: dict, submission_id: str, args: list[str], cwd: str | Path,
               timeout: float = 1200) -> tuple[str, str]:
    """`ray job submit -- python jobs/full.py ARGS` from the repository at `cwd`, as the README gives it (working
    dir uploaded, cluster/runtime_env.yaml); returns (final status: SUCCEEDED / FAILED / STOPPED, the job's logs)."""
    ray = str(BIN / "ray")
    subprocess.run([ray, "job", "submit", f"--address={address}", f"--submission-id={submission_id}",
                    "--working-dir=.", "--runtime-env=cluster/runtime_env.yaml", "--", "python", "jobs/full.py", *args],
                   cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    status = subprocess.run([ray, "job", "status", f"--address={address}", submission_id],
                            env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    logs = subprocess.run([ray, "job", "logs", f"--address={address}", submission_id],
                          env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    final = re.search(rf"Job '{submission_id}' (succeeded|failed|stopped)", status)
    return (final.group(1).upper() if final else status), logs


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safeconf.testing.local_cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (custom resources node_a, node_b, ...)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs each worker node offers")
    parser.add_argument("--gpus", type=int, default=0,
                        help="logical GPUs each worker node offers (GPU resources with no device behind them)")
    parser.add_argument("--head-cpus", type=int, default=0, help="CPUs of the head (0: no tasks there, as on a cloud cluster)")
    parser.add_argument("--no-dashboard", action="store_true", help="no dashboard (no `ray job submit`)")
    parser.add_argument("--fast-failure-detection", action="store_true",
                        help="mark a lost node dead in ~2 s instead of Ray's default ~15-30 s")
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= 26:
        parser.error("--workers must be between 1 and 26")
    workers = {f"node_{chr(ord('a') + i)}": args.cpus for i in range(args.workers)}
    cluster = LocalCluster(workers, head_cpus=args.head_cpus, include_dashboard=not args.no_dashboard,
                           system_config=FAST_FAILURE_DETECTION if args.fast_failure_detection else None,
                           gpus={name: args.gpus for name in workers})
    def on_term(*_):  # `kill PID` stops the nodes too, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    cluster.start()
    try:
        ids = cluster.wait_for({name: True for name in cluster.nodes})
        print(f"Ray cluster on {cluster.address}: head + {', '.join(cluster.workers)}; logs in {cluster.root}")
        for name, node in cluster.nodes.items():
            print(f"  {name}: {node.num_cpus} CPUs, {node.num_gpus} logical GPUs, node id {ids[name]}, `ray start` pid {node.process.pid}")
        print("In another shell:")
        print(f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={cluster.env['RAY_AUTH_TOKEN_PATH']}")
        print(f"  python -c 'import ray; ray.init(address=\"{cluster.address}\"); print(ray.nodes())'")
        if cluster.dashboard_url:
            print(f"  ray job submit --address={cluster.dashboard_url} --working-dir . -- python jobs/full.py ...")
        print("Ctrl-C stops every node.", flush=True)
        while all(node.process.poll() is None for node in cluster.nodes.values()):
            time.sleep(1)
        print("a node exited; stopping the others", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
