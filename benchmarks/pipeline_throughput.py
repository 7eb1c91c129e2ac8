"""Throughput of the data pipeline: the Ray Data pipeline against a plain single-process loop doing the same
work with the same engine code, and the vllm engine against the hf engine. All figures come from one run.

    .venv/bin/python benchmarks/pipeline_throughput.py --questions 48

Each measurement runs the same questions with the same seeds: rule-based mutations (the LLM operators
are off so every run does the same amount of work), every variant x k samples, then the confidence map.
Each runs in a fresh process (an engine left in the parent would hold threads and memory). `seconds`
includes loading the model (in the loop) or starting the actor that loads it (in Ray); `steady` is the
time from the first finished batch to the last, where start-up no longer counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import pyarrow as pa

RULE_WORK = ["mutation.operators=shuffle,polarity,relabel,framing", "mutation.variants_per_question=3", "sampling.k=4"]


def _batches_plain_loop(questions: pa.Table, config):
    """The same stage code, called in a loop in this process: no Ray."""
    from safeconf.pipeline import EngineStage, confidence_batch, mutate_batch

    stage = EngineStage(config.to_dict())
    size = config.engine.batch_size
    for i in range(0, questions.num_rows, size):
        yield confidence_batch(stage(mutate_batch(questions.slice(i, size), config.to_dict())))


def _batches_ray_pipeline(questions: pa.Table, config):
    import ray

    from safeconf.pipeline import build_dataset

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    yield from build_dataset(questions, config).iter_batches(batch_format="pyarrow", batch_size=None)
    ray.shutdown()


def run_one(engine: str, runner: str, count: int, overrides: list[str]) -> dict:
    from safeconf.config import load_config
    from safeconf.pipeline import ingest

    questions, _, _ = ingest("embedded", limit=count)
    config = load_config(overrides=RULE_WORK + [f"engine.kind={engine}"] + overrides)
    batches = _batches_plain_loop if runner == "plain loop" else _batches_ray_pipeline
    started = time.perf_counter()
    tokens, rows, first_done, tokens_after_first = 0, 0, None, 0
    for batch in batches(questions, config):
        batch_tokens = sum(s["num_tokens"] for row in batch.to_pylist() for v in row["variants"] for s in v["samples"])
        tokens += batch_tokens
        rows += batch.num_rows
        if first_done is None:
            first_done = time.perf_counter()
        else:
            tokens_after_first += batch_tokens
    ended = time.perf_counter()
    seconds, steady = ended - started, ended - first_done
    return {"run": f"{engine} {runner}", "questions": rows, "seconds": round(seconds, 1),
            "generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "questions_per_s": round(rows / seconds, 3), "steady_seconds": round(steady, 1),
            "steady_tokens_per_s": round(tokens_after_first / steady, 1) if steady > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--engines", default="vllm,hf")
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "RUNNER"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.questions, args.overrides)), flush=True)
        return

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.questions} questions; "
          f"work: {' '.join(RULE_WORK + args.overrides)}", flush=True)
    by_run = {}
    for engine in args.engines.split(","):
        for runner in ("plain loop", "ray pipeline"):
            child = subprocess.run(
                [sys.executable, __file__, "--questions", str(args.questions), "--one", engine, runner, *args.overrides],
                capture_output=True, text=True, check=True,
            )
            result = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("RESULT "))[7:])
            by_run[result["run"]] = result
            print(json.dumps(result), flush=True)
    print("\nratios (same run):")
    for engine in args.engines.split(","):
        loop, pipe = by_run[f"{engine} plain loop"], by_run[f"{engine} ray pipeline"]
        print(f"  {engine}: ray pipeline / plain loop tokens/s = {pipe['tokens_per_s'] / loop['tokens_per_s']:.2f} "
              f"(wall time {pipe['seconds'] / loop['seconds'] - 1:+.1%}); steady state "
              f"{pipe['steady_tokens_per_s'] / loop['steady_tokens_per_s']:.2f}")
    if {"vllm plain loop", "hf plain loop"} <= set(by_run):
        for runner in ("plain loop", "ray pipeline"):
            ratio = by_run[f"vllm {runner}"]["tokens_per_s"] / by_run[f"hf {runner}"]["tokens_per_s"]
            print(f"  vllm / hf tokens/s ({runner}) = {ratio:.2f}")


if __name__ == "__main__":
    main()
