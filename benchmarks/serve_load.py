"""Load on the Ray Serve endpoint against calling the engine directly, on loopback, in one run.

    .venv/bin/python benchmarks/serve_load.py [--requests 24] [--levels 1,8,32,64] [--compare-batched]
        [--kill-replica] [--json] [--time-limit 900] [key=value ...]

e.g. `engine.kind=vllm` (vLLM's async engine in the replica, serve.replica_engine=auto) or
`model.adapter=runs/x/train/adapter`; the overrides apply to every path.

What it measures, with the same judge requests (embedded questions: multiple choice and safe/unsafe judgements,
en and zh) and the same judgement code (`safeconf.serving.judge_batch`):
- direct: `judge_batch` on one request per call in a fresh process, no Ray, no HTTP, with the engine a replica
  would build (the async vLLM engine: as many calling threads as the level's concurrency, their prompts sharing
  the running batch; the hf engine: one call at a time, as its replica's one engine thread);
- serve: POST /v1/judge to a local Serve app (one replica, auth on) at each concurrency level, and GET /healthz
  at concurrency 1 (no model work: the cost of HTTP, the proxy and the replica alone);
- --compare-batched: the same levels on a second app with serve.replica_engine=batched (the replica before the
  async engine: @serve.batch and one engine thread), in the same run.
Per level: p50 / p99 latency, requests/s and the count of 5xx (must be 0). Then the ratios the endpoint is held
to: Serve's p50 at concurrency 1 over the direct p50 (<= 1.2), requests/s at concurrency 8 over concurrency 1
(>= 2), and with --compare-batched requests/s at concurrency 32 over the batched replica's (>= 1.5).

With --kill-replica, then a fault phase: 8 clients send /v1/judge in a loop while the engine replica is killed
(ray.kill on its actor, as an OOM kill or a lost node would); it counts the answers by status (200, 503 with
Retry-After, any other 5xx, a dropped connection or a client timeout), the longest request, and the time from
the kill to the first 200 of a request sent after it (only a new replica can answer that one).

Bounded: a fixed number of requests per level (--requests at concurrency 1 and direct, 4x the concurrency at
the others, at least --requests), a warm-up of 3 requests per path, and a time limit for the whole run after
which no request is started (the report then says so). It only talks to 127.0.0.1, on a private Ray it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
import time

WARMUP = 3
RECOVERY_KEY = "kill to first 200 of a request sent after it, s"
OVERRIDES = ["engine.kind=hf", "engine.memory_gib=1"]


def judge_bodies(count: int) -> list[dict]:
    """Request bodies from the embedded questions, mcq and judgements mixed, in a fixed order."""
    from safeconf.data.ingest import ingest

    questions = ingest("embedded")[0].to_pylist()
    step = max(1, len(questions) // count)
    picked = (questions[::step] * count)[:count]
    return [{"question": q["question"], "options": q["options"], "lang": q["lang"]} for q in picked]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(latencies: list[float], seconds: float, errors_5xx: int, other_errors: int, cut: bool) -> dict:
    return {
        "requests": len(latencies), "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p99_ms": round(1000 * percentile(latencies, 99), 1), "requests_per_s": round(len(latencies) / seconds, 2),
        "5xx": errors_5xx, "other_errors": other_errors, "time_limit_hit": cut,
    }


# --- direct: the engine in this process, one request per call ---


def run_direct(requests: int, levels: list[int], deadline: float, overrides: list[str]) -> dict:
    """{level: summary} of judge_batch calls, one request each, `level` callers at once (threads on the async
    engine; one at a time on a batch engine, which is not thread-safe)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from safeconf.config import load_config
    from safeconf.engines import make_engine
    from safeconf.serving import JudgeRequest, judge_batch, judge_item, resolve_policy
    from safeconf.serving.deployment import replica_is_async

    config = load_config(overrides=OVERRIDES + overrides)
    asynchronous = replica_is_async(config)
    engine = make_engine(config.model, config.engine, seed=config.sampling.seed, asynchronous=asynchronous)
    policy = resolve_policy(config)
    one_at_a_time = threading.Lock()

    def timed(item) -> float | None:
        if time.time() > deadline:
            return None
        began = time.perf_counter()
        if asynchronous:
            judge_batch(engine, [item], policy.method, policy.settings)
        else:
            with one_at_a_time:
                judge_batch(engine, [item], policy.method, policy.settings)
        return time.perf_counter() - began

    results = {}
    for level in levels:
        count = level_requests(requests, level)
        items = [judge_item(JudgeRequest.model_validate(b)) for b in judge_bodies(count)]
        with ThreadPoolExecutor(level) as threads:
            list(threads.map(timed, items[:WARMUP]))
            started = time.perf_counter()
            latencies = [t for t in threads.map(timed, items) if t is not None]
            seconds = time.perf_counter() - started
        results[level] = summary(latencies or [float("nan")], seconds, 0, 0, len(latencies) < count)
    return results


def level_requests(requests: int, level: int) -> int:
    """Requests sent at a concurrency level: --requests at 1, 4x the concurrency (at least --requests) above."""
    return requests if level == 1 else max(requests, 4 * level)


# --- serve: HTTP on loopback ---


def start_ray(port: int) -> None:
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-bench-"))
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def measure_app(url: str, token: str, token_env: str, overrides: list[str], levels: list[int], requests: int,
                deadline: float, name: str, kill_replica: bool = False) -> dict:
    """One Serve app (one replica) under the load levels, then (kill_replica) the fault phase; deleted after."""
    from ray import serve

    from safeconf.config import load_config
    from safeconf.serving import build_app

    config = load_config(overrides=OVERRIDES + [f"serve.auth_token_env={token_env}"] + overrides)
    began = time.time()
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    print(f"Serve app {name} ready in {time.time() - began:.1f} s", file=sys.stderr, flush=True)
    url = f"{url}/{name}"
    results = {}
    try:
        asyncio.run(load_level(url, token, judge_bodies(WARMUP), 1, deadline))
        results["healthz"] = asyncio.run(load_level(url, token, [None] * 50, 1, deadline))
        for level in levels:
            results[level] = asyncio.run(load_level(url, token, judge_bodies(level_requests(requests, level)), level,
                                                    deadline))
        if kill_replica:
            kill, pid_before, handle = kill_engine_replica(name)
            cores_before = engine_core_processes()
            fault = asyncio.run(replica_kill(url, token, judge_bodies(32), kill, deadline, clients=8))
            fault["new replica"] = handle.replica_info.remote().result()["pid"] != pid_before
            # vLLM's async engine runs its core in a child of the replica: one left behind by the killed replica
            # would hold its memory and cores beside the new one's
            fault["engine core processes before / after"] = [cores_before, engine_core_processes()]
            results["fault"] = fault
    finally:
        serve.delete(name)
    return results


async def load_level(url: str, token: str, bodies: list[dict], concurrency: int, deadline: float) -> dict:
    """`len(bodies)` requests with at most `concurrency` in flight; none started after the deadline."""
    import httpx

    latencies, counts = [], {"5xx": 0, "other": 0}
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                                 limits=limits) as client:
        async def one(body):
            async with gate:
                if time.time() > deadline:
                    return
                began = time.perf_counter()
                try:
                    if body is None:  # no model work: what HTTP, the proxy and the replica cost alone
                        response = await client.get("/healthz")
                    else:
                        response = await client.post("/v1/judge", json=body)
                except httpx.HTTPError:
                    counts["other"] += 1
                    return
                if response.status_code >= 500:
                    counts["5xx"] += 1
                elif response.status_code != 200:
                    counts["other"] += 1
                else:
                    latencies.append(time.perf_counter() - began)

        started = time.perf_counter()
        await asyncio.gather(*[one(b) for b in bodies])
        seconds = time.perf_counter() - started
    return summary(latencies or [float("nan")], seconds, counts["5xx"], counts["other"],
                   len(latencies) + counts["5xx"] + counts["other"] < len(bodies))


async def replica_kill(url: str, token: str, bodies: list[dict], kill, deadline: float, clients: int = 4,
                       settle_s: float = 2.0, recover_within_s: float = 240.0) -> dict:
    """`clients` loops of POST /v1/judge; kill() after settle_s; they stop settle_s after the first 200 to a
    request sent after the kill, or recover_within_s after the kill, or at the deadline."""
    import httpx

    answers, kill_at, recovered_at = [], None, None
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=180) as client:
        async def loop(i: int):
            nonlocal recovered_at
            n = i
            while not stop.is_set() and time.time() < deadline:
                body, n = bodies[n % len(bodies)], n + clients
                began = time.time()
                try:
                    response = await client.post("/v1/judge", json=body)
                    status, retry_after = response.status_code, response.headers.get("retry-after")
                except httpx.HTTPError as error:  # a dropped connection or a client timeout
                    status, retry_after = type(error).__name__, None
                answers.append({"began": began, "seconds": time.time() - began, "status": status,
                                "retry_after": retry_after})
                if status == 200 and kill_at is not None and began > kill_at and recovered_at is None:
                    recovered_at = time.time()

        async def killer():
            nonlocal kill_at
            await asyncio.sleep(settle_s)
            await asyncio.to_thread(kill)
            kill_at = time.time()
            while recovered_at is None and time.time() < min(deadline, kill_at + recover_within_s):
                await asyncio.sleep(0.25)
            await asyncio.sleep(settle_s)  # a little load on the new replica
            stop.set()

        await asyncio.gather(killer(), *[loop(i) for i in range(clients)])

    statuses = [a["status"] for a in answers]
    return {
        "requests": len(answers), "200": statuses.count(200), "503": statuses.count(503),
        "503 with Retry-After": sum(a["status"] == 503 and a["retry_after"] is not None for a in answers),
        "other 5xx": sum(isinstance(s, int) and s >= 500 and s != 503 for s in statuses),
        "dropped or timed out": sum(not isinstance(s, int) for s in statuses),
        "other": sum(isinstance(s, int) and s < 500 and s != 200 for s in statuses),
        "longest request s": round(max(a["seconds"] for a in answers), 2),
        RECOVERY_KEY: round(recovered_at - kill_at, 1) if recovered_at and kill_at else None,
    }


def engine_core_processes() -> int:
    """Processes of vLLM engine cores on this machine (named VLLM::EngineCore)."""
    import psutil

    return sum(1 for p in psutil.process_iter(["name", "cmdline"])
               if "EngineCore" in (p.info["name"] or "") or "EngineCore" in " ".join(p.info["cmdline"] or []))


def kill_engine_replica(app_name: str):
    """The kill for the fault phase, and the engine replica's pid before it (to show a new one answered)."""
    import ray
    from ray import serve

    handle = serve.get_deployment_handle("SafeConfJudge", app_name=app_name)
    before = handle.replica_info.remote().result()
    return (lambda: ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)), \
        before["pid"], handle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24, help="requests at concurrency 1 (default 24; 4x the "
                        "concurrency, at least this, above)")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run (default 900)")
    parser.add_argument("--levels", default="1,8,32,64", help="concurrency levels (default 1,8,32,64; 1 and 8 are "
                        "needed for the ratios, 32 for the batched comparison)")
    parser.add_argument("--compare-batched", action="store_true", help="also the levels on a replica with "
                        "serve.replica_engine=batched (the replica before the async engine), in the same run")
    parser.add_argument("--kill-replica", action="store_true", help="after the levels, the fault phase: the engine "
                        "replica killed under a loop of 8 clients")
    parser.add_argument("--json", action="store_true", help="print only the results as one JSON object")
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("overrides", nargs="*", help="config overrides for every path, e.g. engine.kind=vllm "
                        "model.adapter=DIR serve.max_batch_size=8")
    args = parser.parse_args()
    deadline = time.time() + args.time_limit
    levels = [int(c) for c in args.levels.split(",")]
    load_at_start = os.getloadavg()[0]
    if args.direct:
        print(json.dumps(run_direct(args.requests, levels, deadline, args.overrides)))
        return

    # Direct first, in a fresh process: its engine's threads and memory are gone before Serve runs.
    child = subprocess.run([sys.executable, __file__, "--direct", "--requests", str(args.requests), "--levels",
                            args.levels, "--time-limit", str(args.time_limit), *args.overrides], capture_output=True,
                           text=True)
    if child.returncode:
        sys.exit(f"the direct run failed:\n{child.stderr[-4000:]}")
    direct = {int(level): r for level, r in json.loads(child.stdout.strip().splitlines()[-1]).items()}

    token_env, token = "SAFECONF_BENCH_TOKEN", secrets.token_hex(16)
    os.environ[token_env] = token
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ray(port)
    url = f"http://127.0.0.1:{port}"
    from ray import serve

    try:
        served = measure_app(url, token, token_env, args.overrides, levels, args.requests, deadline, "bench",
                             args.kill_replica)
        batched = measure_app(url, token, token_env, args.overrides + ["serve.replica_engine=batched"], levels,
                              args.requests, deadline, "batched") if args.compare_batched else {}
    finally:
        serve.shutdown()
    results = assemble(direct, served, batched, args, (load_at_start, os.getloadavg()[0]))
    if args.json:
        print(json.dumps(results))
    else:
        report(results)


def assemble(direct: dict, served: dict, batched: dict, args, load: tuple[float, float]) -> dict:
    """The --json object: per concurrency level Serve's figures beside the direct calls' (and the batched
    replica's), the fault phase, the targets and where it ran."""
    from safeconf.config import load_config
    from safeconf.serving.deployment import replica_is_async

    levels = {}
    for level, r in direct.items():
        entry = {"rps": None, "p50_ms": None, "p99_ms": None, "5xx": None}
        if level in served:
            entry = {"rps": served[level]["requests_per_s"], "p50_ms": served[level]["p50_ms"],
                     "p99_ms": served[level]["p99_ms"], "5xx": served[level]["5xx"],
                     "requests": served[level]["requests"], "time_limit_hit": served[level]["time_limit_hit"]}
        entry.update({"direct_rps": r["requests_per_s"], "direct_p50_ms": r["p50_ms"], "direct_p99_ms": r["p99_ms"]})
        if level in batched:
            entry.update({"batched_rps": batched[level]["requests_per_s"], "batched_p50_ms": batched[level]["p50_ms"],
                          "batched_p99_ms": batched[level]["p99_ms"], "batched_5xx": batched[level]["5xx"]})
        levels[str(level)] = entry
    targets = {}
    one, eight, thirty_two = levels.get("1"), levels.get("8"), levels.get("32")
    if one and one["p50_ms"]:
        targets["serve_p50_over_direct_c1"] = {"value": round(one["p50_ms"] / one["direct_p50_ms"], 2), "target": "<= 1.2"}
    if one and eight and one["rps"] and eight["rps"]:
        targets["rps_c8_over_c1"] = {"value": round(eight["rps"] / one["rps"], 2), "target": ">= 2"}
    if thirty_two and thirty_two.get("batched_rps") and thirty_two["rps"]:
        targets["rps_c32_over_batched"] = {"value": round(thirty_two["rps"] / thirty_two["batched_rps"], 2),
                                           "target": ">= 1.5"}
    errors = sum(e["5xx"] or 0 for e in levels.values()) + sum(e.get("batched_5xx") or 0 for e in levels.values())
    targets["5xx_outside_the_kill"] = {"value": errors, "target": "0"}
    fault = served.get("fault")
    if fault:
        targets["kill_only_200_and_503_retry_after"] = {
            "value": fault["other 5xx"] == fault["dropped or timed out"] == fault["other"] == 0
            and fault["503"] == fault["503 with Retry-After"], "target": "true"}
    config = load_config(overrides=OVERRIDES + args.overrides)
    return {"concurrency": levels, "healthz": served.get("healthz"), "fault": fault, "targets": targets,
            "machine": {"arch": platform.machine(), "cores": os.cpu_count(), "load_1min_start_end": [round(x, 2) for x in load]},
            "replica_engine": "async" if replica_is_async(config) else "batched",
            "overrides": OVERRIDES + args.overrides,
            "model": config.model.name + (f" + adapter {config.model.adapter}" if config.model.adapter else "")}


def report(results: dict) -> None:
    machine = results["machine"]
    print(f"\nmachine: {machine['arch']}, {machine['cores']} cores, 1-minute load {machine['load_1min_start_end']} "
          f"at start / end (other work on the machine skews every figure); model: {results['model']}; replica "
          f"engine: {results['replica_engine']}; overrides: {' '.join(results['overrides'])}")
    print(f"{'concurrency':>11}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'direct req/s':>13}{'direct p50':>11}"
          f"{'batched req/s':>14}{'batched p50':>12}{'5xx':>5}")
    for level, e in results["concurrency"].items():
        print(f"{level:>11}{e['rps'] or '-':>8}{e['p50_ms'] or '-':>9}{e['p99_ms'] or '-':>9}{e['direct_rps']:>13}"
              f"{e['direct_p50_ms']:>11}{e.get('batched_rps', '-'):>14}{e.get('batched_p50_ms', '-'):>12}"
              f"{e['5xx'] if e['5xx'] is not None else '-':>5}")
    if results["healthz"]:
        print(f"GET /healthz at concurrency 1: p50 {results['healthz']['p50_ms']} ms")
    for name, t in results["targets"].items():
        print(f"{name}: {t['value']} (target {t['target']})")
    if results["fault"]:
        print(f"fault phase: {json.dumps(results['fault'])}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
