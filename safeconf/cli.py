"""The `safeconf` console script: one subcommand per stage, one typed config (YAML + key=value overrides)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from safeconf.config import describe_options, load_config
from safeconf.schema import DataFormatError


def _options_epilog() -> str:
    lines = ["config keys (set in --config YAML or as key=value overrides, e.g. sampling.k=8 engine.kind=vllm):"]
    for key, default, help_text in describe_options():
        lines.append(f"  {key} (default {default})\n      {help_text}")
    return "\n".join(lines)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file; key=value overrides apply on top of it")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampling.k=8")


def add_stage(stages, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A stage's subcommand, its help ending with every config key (key=value overrides)."""
    return stages.add_parser(name, help=help, description=description, epilog=_options_epilog(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safeconf", description="Calibrated LLM safety self-evaluation on Ray.")
    stages = parser.add_subparsers(dest="stage", required=True)
    _guard_command(stages)
    _pipeline_command(stages)
    _train_command(stages)
    _evaluate_command(stages)
    _judge_command(stages)
    _serve_command(stages)
    return parser


def _guard_command(stages) -> None:
    guard = add_stage(
        stages, "guard",
        help="guard-tuning: plain fine-tuning on a gold-labelled pool, before SafeConf (safeconf.guard)",
        description="Fine-tune the model on the gold answers of a labelled pool (no confidence in the target) and "
        "merge the LoRA into OUT/guard/merged: the model to run the other stages on (model.name=OUT/guard/merged; "
        "jobs/full.py with guard.data does this itself). Pool questions that equal a calibration (data) or held-out "
        "(eval.data) question are left out and counted; OUT/guard/guard_summary.json has the counts and the "
        "training summary. Resumes like train; --fresh starts over.",
    )
    guard.add_argument("--data", help="the gold-labelled pool SPEC (guard.data)")
    guard.add_argument("--out", help="run directory; the stage writes OUT/guard/ (default: runs/latest)")
    guard.add_argument("--fresh", action="store_true", help="remove the guard run's checkpoints and start over")
    _add_common(guard)


def _pipeline_command(stages) -> None:
    pipeline = add_stage(
        stages, "pipeline",
        help="questions -> mutations -> k samples -> self-consistency confidence -> fine-tuning set",
        description="Stream safety questions through Ray Data and write a confidence-labelled fine-tuning set: "
        "OUT/confidence/ (one row per question with its variants and samples), OUT/sft/{train,val}.parquet, "
        "OUT/rejects/ (rows refused at the door, with their location, field and reason) and OUT/summary.json.",
    )
    pipeline.add_argument("--data", help="questions SPEC: a path, format:path or 'embedded' (default: embedded)")
    pipeline.add_argument("--out", help="output directory, local or s3:// / gs:// (default: runs/latest)")
    pipeline.add_argument("--limit", type=int, help="read at most N rows")
    _add_common(pipeline)


def _train_command(stages) -> None:
    train = add_stage(
        stages, "train",
        help="LoRA fine-tuning on the SFT set with Ray Train + DeepSpeed ZeRO",
        description="Fine-tune the model on the set `safeconf pipeline` wrote, across train.num_workers Ray Train "
        "workers, and write OUT/adapter (PEFT LoRA, HF format), OUT/merged with train.merge=true, checkpoints "
        "under train.storage_path (default OUT/checkpoints) and OUT/train_summary.json. The Ray Train run is "
        "named train.run_name-<key>, the key a hash of the SFT files and every config key that changes the "
        "result (safeconf.stages): re-running with the same inputs resumes an interrupted run (or restores the "
        "finished one), other inputs start a new run; --fresh starts over.",
    )
    train.add_argument("--dataset", help="SFT folder with train.parquet and val.parquet (OUT/sft of a pipeline run); "
                       "default train.dataset, else RUN/sft with --run")
    train.add_argument("--run", help="a run directory (jobs/full.py's out, or `safeconf pipeline --out`): train on "
                       "its sft/ unless --dataset or train.dataset is given")
    train.add_argument("--out", required=True, help="output directory, local or s3:// / gs://")
    train.add_argument("--fresh", action="store_true",
                       help="remove this run's checkpoints and train from step 0 instead of resuming")
    _add_common(train)


def _evaluate_command(stages) -> None:
    evaluate = add_stage(
        stages, "evaluate",
        help="every confidence method vs the fine-tuned model: metrics, plots, report",
        description="Run every confidence method (verbalized, self-consistency, mutation consistency, token "
        "probability, P(True), and SafeConf with an adapter) on held-out questions and write OUT/metrics.json, "
        "OUT/report.md, OUT/report.html and PNG plots. The questions: --data, else eval.data, else the held-out "
        "split of the run (RUN/sft/val_questions.parquet), never the training questions. The run: --run, else "
        "the folder above --out when it holds sft/val_questions.parquet (--out RUN/eval, as jobs/full.py "
        "writes); its adapter RUN/train/adapter is used when present, unless --adapter or model.adapter.",
    )
    evaluate.add_argument("--data", help="held-out questions SPEC (default: eval.data, else RUN/sft/val_questions.parquet)")
    evaluate.add_argument("--run", help="the run directory to evaluate, or an experiment's output directory (its "
                          "main run, OUT/main; default: the folder above --out when it holds "
                          "sft/val_questions.parquet)")
    evaluate.add_argument("--model", help="model (default: the run's guard-tuned model RUN/guard/merged when it has "
                          "one, else model.name)")
    evaluate.add_argument("--adapter", help="LoRA adapter folder of the fine-tuned model (OUT/adapter of `safeconf "
                          "train`; default model.adapter, else RUN/train/adapter when present)")
    evaluate.add_argument("--out", required=True, help="output directory, local or s3:// / gs://")
    _add_common(evaluate)


def _judge_command(stages) -> None:
    judge = add_stage(
        stages, "judge",
        help="offline batch judging: every row of a question set or text log, with a run's calibrated method",
        description="Judge every row of --data with the method and threshold the endpoint serves (the same judging "
        "code): OUT/judgements/*.parquet (per row: label, p_unsafe, tier, confidence, decision), OUT/rejects/ "
        "(rows refused, with their location and reason) and OUT/summary.json (counts per tier; read = judged + "
        "rejected). Streamed through Ray Data: files are read and validated on the workers, an engine pool judges "
        "(engine.concurrency, or MIN-MAX for an autoscaling pool). With --run, the run's tuned model, adapter and "
        "calibrated threshold; else model.*, serve.metrics_path and serve.threshold as for `safeconf serve`.",
    )
    judge.add_argument("--data", required=True, help="SPEC: a question set (format:path, a .jsonl / .parquet file, a "
                       "folder or a glob, local or s3://), or a plain log with --text-column")
    judge.add_argument("--out", required=True, help="output directory, local or s3:// / gs://")
    judge.add_argument("--run", help="a finished run (jobs/full.py's out, or an experiment's output directory): "
                       "judge with its model, adapter and calibrated threshold")
    judge.add_argument("--text-column", default="", help="judge the texts of this column of a .jsonl / Parquet log "
                       "(no gold labels needed) instead of questions")
    _add_common(judge)


def _serve_command(stages) -> None:
    serve = add_stage(
        stages, "serve",
        help="Ray Serve endpoint: calibrated judgements over HTTP (+ OpenAI-style chat)",
        description="Start the SafeConf Ray Serve application on the local Ray or a cluster: POST /v1/judge, "
        "POST /v1/moderations, POST /v1/chat/completions, GET /healthz. Importable as safeconf.serving:app for `serve run` / KubeRay.",
    )
    serve.add_argument("--model", help="model (default: model.name)")
    serve.add_argument("--adapter", help="LoRA adapter folder of the fine-tuned model")
    serve.add_argument("--port", type=int, help="HTTP port (default: the serve config's port)")
    _add_common(serve)


def evaluation_run(args) -> str | None:
    """The run directory `safeconf evaluate` evaluates: --run (an experiment's output directory stands for its
    main SafeConf run: OUT/calibration on a guard-tuned model, else OUT/main), else the folder above --out when it
    holds the pipeline's held-out split (--out RUN/eval)."""
    from safeconf import io, stages

    if args.run:
        run = io.normalise_uri(args.run)
        for main_run in (io.join(run, "calibration"), io.join(run, "main")):
            if io.exists(stages.marker_path(main_run, "train")):
                return main_run
        return run
    parent = io.normalise_uri(args.out).rstrip("/").rsplit("/", 1)[0]
    return parent if io.exists(stages.val_questions(parent)) else None


def run_model(run: str) -> str | None:
    """The model a run's stages started from: its own guard-tuned model, else the model.name its train (or
    pipeline) stage recorded (a folder such as an experiment's guard model, or a hub name); None if neither ran."""
    from safeconf import io, stages
    from safeconf.guard import guard_model

    if io.exists(guard_model(run)):
        return guard_model(run)
    for stage in ("train", "pipeline"):
        name = (((stages.read_marker(run, stage) or {}).get("inputs") or {}).get("config") or {}).get("model.name")
        if isinstance(name, str):
            return name
    return None


def stage_plan(args, config):
    """The StagePlan of the subcommand, with the defaults of safeconf.stages."""
    from safeconf import io, stages

    if args.stage == "guard":
        plan = stages.guard_plan(config)
        if plan is None:
            raise SystemExit("safeconf guard: give the pool: --data SPEC or guard.data=SPEC")
        return plan
    if args.stage == "pipeline":
        return stages.pipeline_plan(config)
    if args.stage == "train":
        dataset = args.dataset or config.train.dataset or (io.join(args.run, "sft") if args.run else "")
        if not dataset:
            raise SystemExit("safeconf train: give --dataset DIR, train.dataset=DIR or --run DIR (the SFT folder "
                             "of a pipeline run)")
        return stages.train_plan(config, dataset, config.out)
    run = evaluation_run(args)
    data = stages.evaluation_data(config, args.data, run)
    adapter = args.adapter or config.model.adapter
    if not adapter and run and io.exists(io.join(run, "train", "adapter")):
        adapter = io.join(run, "train", "adapter")
    model = args.model or (run_model(run) if run else None)  # the baselines' model and the adapter's base
    logging.getLogger(__name__).info("evaluating %s on model %s with adapter %s", data, model or config.model.name,
                                     adapter or "(none: baselines only)")
    return stages.evaluate_plan(config, data, config.out, adapter=adapter, model=model)


def judge_config(args, config):
    """The config `safeconf judge` judges with: with --run, the model the run started from (run_model: its
    guard-tuned one when it has one), its adapter and its calibrated threshold (RUN/eval/metrics.json), as the
    endpoint of that run would."""
    from safeconf import io

    if not args.run:
        return config
    run = evaluation_run(args)
    config.model.name = run_model(run) or config.model.name
    config.model.adapter = io.join(run, "train", "adapter")
    config.serve.metrics_path = io.join(run, "eval", "metrics.json")
    for needed in (config.model.adapter, config.serve.metrics_path):
        if not io.exists(needed):
            raise FileNotFoundError(f"--run {args.run}: {needed} is missing (a finished jobs/full.py run has it)")
    return config


def _run_stage(args, config) -> dict:
    if args.stage == "judge":
        from safeconf.batch_judge import run_judge

        return run_judge(judge_config(args, config), args.data, args.out, text_column=args.text_column)
    if args.stage == "serve":
        from safeconf.serving import run_serve

        return {"url": run_serve(config, port=args.port, blocking=True)}
    return stage_plan(args, config).run(fresh=getattr(args, "fresh", False))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # --data of evaluate names the held-out questions, not the config's data (the pipeline's questions)
    explicit = {"out": getattr(args, "out", None), "limit": getattr(args, "limit", None),
                "data": args.data if args.stage == "pipeline" else None}
    if args.stage == "guard" and args.data:
        explicit["guard"] = {"data": args.data}
    if args.stage == "serve":  # the model and adapter options land in the config the replicas are built from
        explicit["model"] = {k: v for k, v in (("name", args.model), ("adapter", args.adapter)) if v}
    try:
        config = load_config(args.config, args.overrides, **explicit)
    except (ValueError, OSError) as error:
        print(f"safeconf {args.stage}: {error}", file=sys.stderr)
        return 2
    try:
        summary = _run_stage(args, config)
    except (DataFormatError, FileNotFoundError, ValueError) as error:
        print(f"safeconf {args.stage}: {error}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, ensure_ascii=False, default=str))
    print(f"safeconf {args.stage}: outputs in {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
