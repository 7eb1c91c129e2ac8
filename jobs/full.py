"""The whole SafeConf run in one job, into one run directory:

    guard     (with guard.data) plain fine-tuning on a gold-labelled pool -> OUT/guard/merged, the model the
              later stages use (safeconf.guard); off by default
    pipeline  questions -> mutations -> k samples -> confidence -> OUT/sft/
    train     LoRA fine-tuning (Ray Train + DeepSpeed) on OUT/sft/train.parquet -> OUT/train/adapter
    evaluate  every confidence method, base model vs fine-tuned, on the held-out questions -> OUT/eval/report.md
    --serve   then deploy the fine-tuned model behind the Ray Serve endpoint (safeconf.serving), accepting or
              deferring judgements at the threshold the evaluation calibrated

Locally: `python jobs/full.py` (the embedded default). On a cluster:
`ray job submit --working-dir . -- python jobs/full.py --config CONFIG [key=value ...]`.

Each finished stage records itself in OUT/stages/<stage>.json with a fingerprint of its inputs (the data it
reads, the config keys that change its result, the fingerprints of the stages it reads from; see
safeconf/stages.py). A rerun skips a stage whose fingerprint is unchanged ("stage X up to date (fingerprint
...)"), and redoes one whose inputs changed, saying which ("inputs changed: sampling.k 4 -> 8"), and through the
fingerprints every stage after it. An interrupted training resumes from its last Ray Train checkpoint: the run
is named after its inputs (train.run_name-<key>), so other inputs never restore an old finished run.
`--from STAGE` redoes that stage and every later one afresh: their outputs and markers are removed first, and
training starts from step 0. A stage whose input comes from a stage left out by --stages must find that stage
up to date, else the job stops before running anything, naming what to add.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from safeconf import io
from safeconf import stages as stage_runs
from safeconf.config import load_config
from safeconf.stages import STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see `safeconf pipeline --help` for every key)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages to run (always in the order guard, pipeline, train, evaluate; "
                        "guard runs only with guard.data)")
    parser.add_argument("--from", dest="from_stage", choices=STAGES,
                        help="redo this stage and every later one afresh (their outputs, markers and, for train, "
                        "checkpoints are removed first), whatever their fingerprints say")
    parser.add_argument("--serve", action="store_true",
                        help="after the stages, deploy the endpoint with OUT/train/adapter and the threshold of "
                        "OUT/eval/metrics.json; on a cluster it stays up after the job, locally until Ctrl-C")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before and after the options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config, args.overrides)
    out = io.normalise_uri(config.out)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")

    def failed(stage: str, error: Exception) -> None:
        print(f"jobs/full.py: stage '{stage}' failed: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"finished stages keep their outputs in {out}; rerun to continue from '{stage}'", file=sys.stderr)

    started = time.time()
    try:
        report = stage_runs.run_job(config, stages, args.from_stage, on_failure=failed)
    except stage_runs.StageOrderError as error:
        print(f"jobs/full.py: {error}", file=sys.stderr)
        return 2
    off = [stage for stage in report if report[stage]["status"] == "off"]  # guard without guard.data
    stages = [stage for stage in report if stage not in off]  # in pipeline order
    final = {
        "run_dir": out,
        "seconds": round(time.time() - started, 1),
        "off": off,
        "stage_seconds": {stage: report[stage]["stage_seconds"] for stage in stages},
        "outputs": {
            **({"guard": io.join(out, "guard", "merged")} if config.guard.data else {}),
            "pipeline": io.join(out, "summary.json"),
            "train": io.join(out, "train", "adapter"),
            "evaluate": io.join(out, "eval", "report.md"),
        },
    }
    final["up_to_date"] = [stage for stage in stages if report[stage]["status"] == "up to date"]
    io.write_json(io.join(out, "full_run.json"), final)
    print(json.dumps(final, indent=2))
    if "evaluate" in stages:
        print(f"report: {io.join(out, 'eval', 'report.md')}")
        metrics = io.join(out, "eval", "metrics.json")
        for warning in (io.read_json(metrics).get("warnings") or []) if io.exists(metrics) else []:
            print(f"warning: {warning if isinstance(warning, str) else json.dumps(warning, ensure_ascii=False)}")
    if args.serve:
        deploy(config, out)
    return 0


def deploy(config, out: str) -> None:
    """The Serve app on this run's adapter and calibrated threshold. Joined to a cluster (a submitted job, or
    ray_address set) the app outlives the job; with a Ray this process started, it serves until Ctrl-C."""
    import os

    from safeconf.serving import run_serve

    config = stage_runs.stage_config(config)  # the guard-tuned model, when the run has one
    config.model.adapter = io.join(out, "train", "adapter")
    config.serve.metrics_path = io.join(out, "eval", "metrics.json")
    on_cluster = bool(config.ray_address or os.environ.get("RAY_ADDRESS"))
    url = run_serve(config, blocking=not on_cluster)
    if on_cluster:
        print(f"endpoint: {url} (POST /v1/judge); it stays up after this job (`serve shutdown` removes it)")


if __name__ == "__main__":
    sys.exit(main())
