"""The whole SafeConf run in one job, into one run directory:

    pipeline  questions -> mutations -> k samples -> confidence -> OUT/sft/
    train     LoRA fine-tuning (Ray Train + DeepSpeed) on OUT/sft/train.parquet -> OUT/train/adapter
    evaluate  every confidence method, base model vs fine-tuned, on the held-out questions -> OUT/eval/report.md
    --serve   then deploy the fine-tuned model behind the Ray Serve endpoint (safeconf.serving), accepting or
              deferring judgements at the threshold the evaluation calibrated

Locally: `python jobs/full.py` (the embedded default). On a cluster:
`ray job submit --working-dir . -- python jobs/full.py --config CONFIG [key=value ...]`.

Each finished stage records itself in OUT/stages/<stage>.json. A rerun skips finished stages (an interrupted
training resumes from its last Ray Train checkpoint); `--from STAGE` redoes that stage and the ones after it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from safeconf import io
from safeconf.config import load_config

STAGES = ("pipeline", "train", "evaluate")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see `safeconf pipeline --help` for every key)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in order")
    parser.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and every later one")
    parser.add_argument("--serve", action="store_true",
                        help="after the stages, deploy the endpoint with OUT/train/adapter and the threshold of "
                        "OUT/eval/metrics.json; on a cluster it stays up after the job, locally until Ctrl-C")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    out = io.normalise_uri(config.out)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")

    redo = set(STAGES[STAGES.index(args.from_stage):]) if args.from_stage else set()
    report, started = {}, time.time()
    for stage in stages:
        marker = io.join(out, "stages", f"{stage}.json")
        if stage not in redo and io.exists(marker):
            report[stage] = io.read_json(marker)
            logging.info("stage %s already finished (%s); skipped", stage, marker)
            continue
        stage_started = time.time()
        try:
            result = _run(stage, config, out)
        except Exception as error:
            print(f"jobs/full.py: stage '{stage}' failed: {type(error).__name__}: {error}", file=sys.stderr)
            print(f"finished stages keep their outputs in {out}; rerun to continue from '{stage}'", file=sys.stderr)
            raise
        report[stage] = {"stage_seconds": round(time.time() - stage_started, 1), "finished": time.time()}
        io.write_json(marker, {**report[stage], "summary": {k: v for k, v in result.items() if k != "config"}})
        logging.info("stage %s done in %.0f s", stage, report[stage]["stage_seconds"])

    final = {
        "run_dir": out,
        "seconds": round(time.time() - started, 1),
        "stage_seconds": {stage: report[stage]["stage_seconds"] for stage in stages},
        "outputs": {
            "pipeline": io.join(out, "summary.json"),
            "train": io.join(out, "train", "adapter"),
            "evaluate": io.join(out, "eval", "report.md"),
        },
    }
    io.write_json(io.join(out, "full_run.json"), final)
    print(json.dumps(final, indent=2))
    if "evaluate" in stages:
        print(f"report: {io.join(out, 'eval', 'report.md')}")
    if args.serve:
        deploy(config, out)
    return 0


def deploy(config, out: str) -> None:
    """The Serve app on this run's adapter and calibrated threshold. Joined to a cluster (a submitted job, or
    ray_address set) the app outlives the job; with a Ray this process started, it serves until Ctrl-C."""
    import os

    from safeconf.serving import run_serve

    config.model.adapter = io.join(out, "train", "adapter")
    config.serve.metrics_path = io.join(out, "eval", "metrics.json")
    on_cluster = bool(config.ray_address or os.environ.get("RAY_ADDRESS"))
    url = run_serve(config, blocking=not on_cluster)
    if on_cluster:
        print(f"endpoint: {url} (POST /v1/judge); it stays up after this job (`serve shutdown` removes it)")


def _run(stage: str, config, out: str) -> dict:
    if stage == "pipeline":
        from safeconf.pipeline import run_pipeline

        return run_pipeline(config)
    if stage == "train":
        from safeconf.train import run_training

        return run_training(config, config.train.dataset or io.join(out, "sft"), io.join(out, "train"))
    from safeconf.evaluation import run_evaluation

    return run_evaluation(
        config,
        config.eval.data or f"parquet:{io.join(out, 'sft', 'val_questions.parquet')}",
        io.join(out, "eval"),
        adapter=io.join(out, "train", "adapter"),
    )


if __name__ == "__main__":
    sys.exit(main())
