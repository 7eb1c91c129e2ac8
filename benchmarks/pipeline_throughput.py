"""Throughput of the data pipeline: the Ray Data pipeline against a plain single-process loop doing the same
work with the same engine code, and the vllm engine against the hf engine. All figures come from one run.

    .venv/bin/python benchmarks/pipeline_throughput.py --questions 48

Each measurement runs the same questions with the same seeds: rule-based mutations (the LLM operators
are off so every run does the same amount of work), every variant x k samples, then the confidence map.
Wall time includes loading the model, in both the loop and the pipeline (the actor loads it there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import pyarrow as pa


def measure(label: str, run) -> dict:
    started = time.perf_counter()
    table = run()
    seconds = time.perf_counter() - started
    tokens = sum(s["num_tokens"] for row in table.to_pylist() for v in row["variants"] for s in v["samples"])
    result = {"run": label, "questions": table.num_rows, "seconds": round(seconds, 1),
              "generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
              "questions_per_s": round(table.num_rows / seconds, 3)}
    print(json.dumps(result), flush=True)
    return result


def plain_loop(questions: pa.Table, config) -> pa.Table:
    """The same stage code, called in a loop in this process: no Ray."""
    from safeconf.pipeline import EngineStage, confidence_batch, mutate_batch

    stage = EngineStage(config.to_dict())
    size = config.engine.batch_size
    parts = [confidence_batch(stage(mutate_batch(questions.slice(i, size), config.to_dict())))
             for i in range(0, questions.num_rows, size)]
    return pa.concat_tables(parts)


def ray_pipeline(questions: pa.Table, config) -> pa.Table:
    from safeconf.pipeline import build_dataset

    return pa.concat_tables(
        [pa.Table.from_pylist(b.to_pylist(), schema=b.schema) for b in
         build_dataset(questions, config).iter_batches(batch_format="pyarrow", batch_size=None)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--engines", default="vllm,hf")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    import ray

    from safeconf.config import load_config
    from safeconf.pipeline import ingest

    base = ["mutation.operators=shuffle,polarity,relabel,framing", "mutation.variants_per_question=3", "sampling.k=4"]
    questions, _, _ = ingest("embedded", limit=args.questions)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{questions.num_rows} questions", flush=True)
    results = []
    for engine in args.engines.split(","):
        config = load_config(overrides=base + [f"engine.kind={engine}"] + args.overrides)
        results.append(measure(f"{engine} plain loop", lambda: plain_loop(questions, config)))
        results.append(measure(f"{engine} ray pipeline", lambda: ray_pipeline(questions, config)))
    by_run = {r["run"]: r for r in results}
    print("\nratios (same run):")
    for engine in args.engines.split(","):
        loop, pipe = by_run[f"{engine} plain loop"], by_run[f"{engine} ray pipeline"]
        print(f"  {engine}: ray pipeline / plain loop tokens/s = {pipe['tokens_per_s'] / loop['tokens_per_s']:.2f}, "
              f"wall time overhead = {pipe['seconds'] / loop['seconds'] - 1:+.1%}")
    if {"vllm plain loop", "hf plain loop"} <= set(by_run):
        print(f"  vllm / hf tokens/s (plain loop) = "
              f"{by_run['vllm plain loop']['tokens_per_s'] / by_run['hf plain loop']['tokens_per_s']:.2f}")
        print(f"  vllm / hf tokens/s (ray pipeline) = "
              f"{by_run['vllm ray pipeline']['tokens_per_s'] / by_run['hf ray pipeline']['tokens_per_s']:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
