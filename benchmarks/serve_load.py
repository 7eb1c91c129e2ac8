"""Load on the Ray Serve endpoint against calling the engine directly, on loopback, in one run.

    .venv/bin/python benchmarks/serve_load.py [--requests 24] [--time-limit 900] [key=value ...]

e.g. `model.adapter=runs/x/train/adapter` (the fine-tuned model states its confidence: one engine call per
batch) or `engine.kind=vllm`; the overrides apply to both paths.

What it measures, with the same judge requests (embedded questions: multiple choice and safe/unsafe judgements,
en and zh) and the same judgement code (`safeconf.serving.judge_batch`):
- direct: `judge_batch` on one request at a time in a fresh process, no Ray, no HTTP, no batching;
- serve: POST /v1/judge to a local Serve app (one replica, auth on) at concurrency 1, 8 and 32, and GET /healthz
  at concurrency 1 (no model work: the cost of HTTP, the proxy and the replica alone).
Per level: p50 / p99 latency, requests/s and the count of 5xx (must be 0). Then the ratios the endpoint is held
to: Serve's p50 at concurrency 1 over the direct p50 (<= 1.2), and requests/s at concurrency 8 over
concurrency 1 (>= 2, what batching buys).

With --kill-replica, then a fault phase: 4 clients send /v1/judge in a loop while the engine replica is killed
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


def run_direct(count: int, deadline: float, overrides: list[str]) -> dict:
    from safeconf.config import load_config
    from safeconf.engines import make_engine
    from safeconf.serving import JudgeRequest, judge_batch, judge_item, resolve_policy

    config = load_config(overrides=OVERRIDES + overrides)
    engine = make_engine(config.model, config.engine, seed=config.sampling.seed)
    items = [judge_item(JudgeRequest.model_validate(b)) for b in judge_bodies(count)]
    policy = resolve_policy(config)
    for item in items[:WARMUP]:
        judge_batch(engine, [item], policy.method, policy.settings)
    latencies, started = [], time.perf_counter()
    for item in items:
        if time.time() > deadline:
            break
        began = time.perf_counter()
        judge_batch(engine, [item], policy.method, policy.settings)
        latencies.append(time.perf_counter() - began)
    return summary(latencies, time.perf_counter() - started, 0, 0, len(latencies) < count)


# --- serve: HTTP on loopback ---


def start_serve(port: int, token_env: str, extra: list[str]) -> None:
    import ray
    from ray import serve

    from safeconf.config import load_config
    from safeconf.serving import build_app

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray-bench-"))
    config = load_config(overrides=OVERRIDES + [f"serve.auth_token_env={token_env}"] + extra)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="safeconf-bench", route_prefix="/")


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
    parser.add_argument("--requests", type=int, default=24, help="requests at concurrency 1 and direct (default 24)")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run (default 900)")
    parser.add_argument("--levels", default="1,8,32", help="concurrency levels (default 1,8,32; 1 and 8 are needed for the ratios)")
    parser.add_argument("--kill-replica", action="store_true", help="after the levels, the fault phase: the engine "
                        "replica killed under a loop of 4 clients")
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("overrides", nargs="*", help="config overrides for both paths, e.g. model.adapter=DIR "
                        "engine.kind=vllm serve.max_batch_size=8")
    args = parser.parse_args()
    deadline = time.time() + args.time_limit
    load_at_start = os.getloadavg()[0]
    if args.direct:
        print(json.dumps(run_direct(args.requests, deadline, args.overrides)))
        return

    # Direct first, in a fresh process: its engine's threads and memory are gone before Serve runs.
    child = subprocess.run([sys.executable, __file__, "--direct", "--requests", str(args.requests),
                            "--time-limit", str(args.time_limit), *args.overrides], capture_output=True, text=True,
                           check=True)
    results = {"direct, concurrency 1": json.loads(child.stdout.strip().splitlines()[-1])}

    token_env, token = "SAFECONF_BENCH_TOKEN", secrets.token_hex(16)
    os.environ[token_env] = token
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    began = time.time()
    start_serve(port, token_env, args.overrides)
    print(f"Serve app ready in {time.time() - began:.1f} s", flush=True)
    url = f"http://127.0.0.1:{port}"
    from ray import serve

    try:
        asyncio.run(load_level(url, token, judge_bodies(WARMUP), 1, deadline))
        results["serve /healthz, conc. 1"] = asyncio.run(load_level(url, token, [None] * 50, 1, deadline))
        for level in [int(c) for c in args.levels.split(",")]:
            count = args.requests if level == 1 else max(args.requests, 4 * level)
            results[f"serve, concurrency {level}"] = asyncio.run(
                load_level(url, token, judge_bodies(count), level, deadline))
        if args.kill_replica:
            kill, pid_before, handle = kill_engine_replica("safeconf-bench")
            fault = asyncio.run(replica_kill(url, token, judge_bodies(32), kill, deadline))
            fault["new replica"] = handle.replica_info.remote().result()["pid"] != pid_before
            results["fault: engine replica killed"] = fault
    finally:
        serve.shutdown()
    report(results, args, (load_at_start, os.getloadavg()[0]))


def report(results: dict, args, load: tuple[float, float]) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, 1-minute load {load[0]:.2f} at start, "
          f"{load[1]:.2f} at end (other work on the machine skews every figure); model: embedded "
          f"SmolLM2-135M-Instruct; overrides: {' '.join(OVERRIDES + args.overrides)}")
    print(f"{'run':<24}{'requests':>9}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>8}{'5xx':>5}{'other':>7}")
    for name, r in results.items():
        if name.startswith("fault"):
            continue
        cut = "  (time limit hit)" if r["time_limit_hit"] else ""
        print(f"{name:<24}{r['requests']:>9}{r['p50_ms']:>10}{r['p99_ms']:>10}{r['requests_per_s']:>8}"
              f"{r['5xx']:>5}{r['other_errors']:>7}{cut}")
    direct, one, eight = (results.get(k) for k in ("direct, concurrency 1", "serve, concurrency 1",
                                                    "serve, concurrency 8"))
    errors = sum(r["5xx"] for name, r in results.items() if not name.startswith("fault"))
    if one:
        overhead = one["p50_ms"] / direct["p50_ms"]
        print(f"\nServe p50 / direct p50 at concurrency 1: {overhead:.2f}x (target <= 1.20: "
              f"{'met' if overhead <= 1.2 else 'missed'})")
    if one and eight:
        speedup = eight["requests_per_s"] / one["requests_per_s"]
        print(f"requests/s at concurrency 8 / concurrency 1: {speedup:.2f}x (target >= 2: "
              f"{'met' if speedup >= 2 else 'missed'})")
    print(f"5xx responses under load: {errors} (target 0: {'met' if errors == 0 else 'missed'})")
    fault = results.get("fault: engine replica killed")
    if fault:
        print(f"\nfault phase: {json.dumps(fault)}")
        clean = fault["other 5xx"] == fault["dropped or timed out"] == fault["other"] == 0 \
            and fault["503"] == fault["503 with Retry-After"]
        back = fault["new replica"] and fault[RECOVERY_KEY] is not None
        print(f"replica killed under load: only 200 and 503 + Retry-After, no hang: {'met' if clean else 'missed'}; "
              f"back (a 200 from a new replica): {'yes' if back else 'no'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
