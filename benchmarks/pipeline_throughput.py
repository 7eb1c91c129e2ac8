"""Throughput of the data pipeline: the Ray Data pipeline against a plain single-process loop doing the same
work with the same engine code, per answer format and engine. All figures come from one run.

    .venv/bin/python benchmarks/pipeline_throughput.py --questions 32 --engines vllm --formats label,free \
        --repeats 2 engine.batch_size=8

Each measurement runs the same questions with the same seeds: rule-based mutations (the LLM operators
are off so every run does the same amount of work), every variant x k samples, then the confidence map.
Each runs in a fresh process (an engine left in the parent would hold threads and memory).

- `seconds`: the whole run, including loading the model (loop) or starting the actor that loads it (Ray).
- steady state: timed where the engine is, inside the stage (TimedEngineStage: the Ray actor, or the loop's
  process), from the end of the first engine batch to the end of the last, so start-up no longer counts but
  everything between batches does (an engine waiting for its next batch is overhead). The driver cannot time
  it: Ray Data may hand several finished batches back at once. `busy` is the share of that span the engine
  spent in its own calls; `batch_s` the mean engine seconds per batch after the first;
  `steady_cpu_s_by_process` the CPU seconds each process used over that span (the engine's process, the driver,
  Ray's own processes: where the cores went).
- label mode (sampling.answer_format=label) scores the option labels and draws k labels per variant: it
  generates nothing, so its tokens/s is no throughput figure (num_tokens there counts scored label tokens);
  compare questions/s and samples/s. Free mode reports generated tokens/s as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import pyarrow as pa

from safeconf.pipeline import EngineStage
from safeconf.testing.processes import ProcessSampler

RULE_WORK = ["mutation.operators=shuffle,polarity,relabel,framing", "mutation.variants_per_question=3", "sampling.k=4"]


class TimedEngineStage(EngineStage):
    """EngineStage that appends one JSON line per engine batch (wall-clock start and end, questions, samples,
    tokens) to `timings`, a file the driver reads after the run (the actor is another process)."""

    def __init__(self, config: dict, timings: str):
        super().__init__(config)
        self.timings = timings

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.time()
        out = super().__call__(batch)
        ended = time.time()
        samples = [s for row in out.to_pylist() for v in row["variants"] for s in v["samples"]]
        with open(self.timings, "a") as f:
            f.write(json.dumps({"start": started, "end": ended, "questions": out.num_rows, "samples": len(samples),
                                "tokens": sum(s["num_tokens"] for s in samples)}) + "\n")
        return out


def _batches_plain_loop(questions: pa.Table, config, timings: str):
    """The same stage code, called in a loop in this process: no Ray."""
    from safeconf.pipeline import confidence_batch, mutate_batch

    stage = TimedEngineStage(config.to_dict(), timings)
    size = config.engine.batch_size
    for i in range(0, questions.num_rows, size):
        yield confidence_batch(stage(mutate_batch(questions.slice(i, size), config.mutation)))


def _batches_ray_pipeline(questions: pa.Table, config, timings: str):
    import ray

    from safeconf.pipeline import build_dataset

    # A short temp dir of our own: Ray's socket paths under it must stay under 107 bytes.
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="rbench", dir="/tmp"))
    yield from build_dataset(questions, config, TimedEngineStage, timings=timings).iter_batches(
        batch_format="pyarrow", batch_size=None)
    ray.shutdown()


def steady_state(batches: list[dict], free: bool) -> dict:
    """Figures from the end of the first engine batch to the end of the last (see the module docstring)."""
    batches = sorted(batches, key=lambda b: b["end"])
    if len(batches) < 2:
        return {"steady_batches": len(batches) - 1}
    after = batches[1:]
    span = after[-1]["end"] - batches[0]["end"]
    figures = {
        "steady_batches": len(after),
        "steady_seconds": round(span, 2),
        "steady_questions_per_s": round(sum(b["questions"] for b in after) / span, 3),
        "steady_samples_per_s": round(sum(b["samples"] for b in after) / span, 2),
        "busy": round(sum(b["end"] - b["start"] for b in after) / span, 3),
        "batch_s": round(sum(b["end"] - b["start"] for b in after) / len(after), 2),
    }
    if free:
        figures["steady_tokens_per_s"] = round(sum(b["tokens"] for b in after) / span, 1)
    return figures


def run_one(engine: str, answer_format: str, runner: str, count: int, overrides: list[str]) -> dict:
    from safeconf.config import load_config
    from safeconf.data.ingest import ingest

    questions, _, _ = ingest("embedded", limit=count)
    config = load_config(overrides=RULE_WORK + [f"engine.kind={engine}", f"sampling.answer_format={answer_format}"]
                         + overrides)
    batches = _batches_plain_loop if runner == "plain loop" else _batches_ray_pipeline
    free = answer_format == "free"
    load_before = os.getloadavg()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as timings:
        with ProcessSampler() as processes:
            started = time.perf_counter()
            rows = sum(batch.num_rows for batch in batches(questions, config, timings.name))
            seconds = time.perf_counter() - started
        engine_batches = sorted((json.loads(line) for line in open(timings.name)), key=lambda b: b["end"])
    result = {"run": f"{engine} {answer_format} {runner}", "questions": rows, "seconds": round(seconds, 1),
              "questions_per_s": round(rows / seconds, 3),
              "samples": sum(b["samples"] for b in engine_batches), "engine_batches": len(engine_batches)}
    if free:
        tokens = sum(b["tokens"] for b in engine_batches)
        result |= {"generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}
    result |= steady_state(engine_batches, free)
    if len(engine_batches) > 1:  # CPU seconds by process over the steady-state span (where the cores went)
        result["steady_cpu_s_by_process"] = processes.cpu_between(engine_batches[0]["end"], engine_batches[-1]["end"])
    result["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--engines", default="vllm,hf")
    parser.add_argument("--formats", default="label,free", help="sampling.answer_format values to measure")
    parser.add_argument("--runners", default="plain loop,ray pipeline")
    parser.add_argument("--repeats", type=int, default=1, help="measure each runner this many times, alternating")
    parser.add_argument("--one", nargs=3, metavar=("ENGINE", "FORMAT", "RUNNER"), help=argparse.SUPPRESS)  # child
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.questions, args.overrides)), flush=True)
        return

    runners = args.runners.split(",")
    formats = args.formats.split(",")
    engines = args.engines.split(",")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.questions} questions; "
          f"work: {' '.join(RULE_WORK + args.overrides)}; load average {os.getloadavg()}", flush=True)
    by_run: dict[str, list[dict]] = {}  # one result per repeat; the runners alternate, so they share the load
    for engine in engines:
        for answer_format in formats:
            for _ in range(args.repeats):
                for runner in runners:
                    child = subprocess.run(
                        [sys.executable, __file__, "--questions", str(args.questions),
                         "--one", engine, answer_format, runner, *args.overrides],
                        capture_output=True, text=True,
                    )
                    lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
                    if child.returncode or not lines:
                        sys.exit(f"{engine} {answer_format} {runner} failed ({child.returncode}):\n"
                                 f"{child.stderr[-4000:]}")
                    result = json.loads(lines[0][7:])
                    by_run.setdefault(result["run"], []).append(result)
                    print(json.dumps(result), flush=True)

    def best(run: str, key: str) -> float | None:
        values = [r[key] for r in by_run[run] if key in r]
        return max(values) if values else None

    print(f"\nratios (same run; best of {args.repeats} per measurement):")
    for engine in engines:
        for answer_format in formats:
            if len(runners) < 2:
                continue
            loop, pipe = (f"{engine} {answer_format} {r}" for r in runners[:2])
            line = (f"  {engine} {answer_format}: {runners[1]} / {runners[0]} questions/s = "
                    f"{best(pipe, 'questions_per_s') / best(loop, 'questions_per_s'):.3f} (whole run)")
            if best(loop, "steady_questions_per_s") and best(pipe, "steady_questions_per_s"):
                ratio = best(pipe, "steady_questions_per_s") / best(loop, "steady_questions_per_s")
                pairs = [p["steady_questions_per_s"] / q["steady_questions_per_s"]
                         for p, q in zip(by_run[pipe], by_run[loop]) if "steady_questions_per_s" in p | q]
                line += (f"; steady state {ratio:.3f} (overhead {1 / ratio - 1:+.1%} time per question; "
                         f"per repeat {', '.join(f'{r:.3f}' for r in pairs)})")
            print(line)
        if {"label", "free"} <= set(formats):
            for runner in runners:
                label, free = f"{engine} label {runner}", f"{engine} free {runner}"
                line = (f"  {engine} {runner}: label / free questions/s = "
                        f"{best(label, 'questions_per_s') / best(free, 'questions_per_s'):.2f} (whole run)")
                if best(label, "steady_questions_per_s") and best(free, "steady_questions_per_s"):
                    line += f", {best(label, 'steady_questions_per_s') / best(free, 'steady_questions_per_s'):.2f} (steady)"
                print(line)
    if {"vllm", "hf"} <= set(engines) and "free" in formats:
        for runner in runners:
            ratio = best(f"vllm free {runner}", "tokens_per_s") / best(f"hf free {runner}", "tokens_per_s")
            print(f"  vllm / hf generated tokens/s, free mode ({runner}) = {ratio:.2f}")

if __name__ == "__main__":
    main()
