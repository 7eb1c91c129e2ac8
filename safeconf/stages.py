"""The stages of a SafeConf run, in one place: what each reads, how its inputs are fingerprinted, where it writes,
and how it runs. `safeconf pipeline|train|evaluate` and `jobs/full.py` both go through here, so a stage runs with
the same defaults whoever calls it (serving stays in safeconf.serving: it runs no stage).

    guard     guard.data (off while empty) -> OUT/guard/{sft, adapter, merged, guard_summary.json}: the model every
              later stage then uses (safeconf.guard)
    pipeline  config.data -> OUT/summary.json, OUT/confidence/, OUT/sft/, OUT/rejects/
    sft       RUN/confidence of a finished pipeline -> OUT/sft: the SFT set of a subset of its questions, with its
              own sft settings and no new sampling (the experiment's learning curve and ablations; not in the job)
    train     OUT/sft (or train.dataset) -> OUT/train/{adapter, merged, train_summary.json}, checkpoints
    evaluate  eval.data (else OUT/sft/val_questions.parquet) + OUT/train/adapter -> OUT/eval/

What each stage reads and what its fingerprint hashes: safeconf.fingerprints.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from safeconf import io
from safeconf.config import Config
from safeconf.fingerprints import (STAGES, TRAINING_STAGES, changed_inputs, config_inputs, fingerprint, run_key_of,
                                   sft_identity, spec_identity, stages_read, train_inputs, upstream)

log = logging.getLogger(__name__)


# --- the stages ---


def _run_guard(config: Config, out: str, run_key: str, fresh: bool = False) -> dict:
    from safeconf.guard import run_guard

    return run_guard(config, out, run_key=run_key, fresh=fresh)


def _run_pipeline(config: Config) -> dict:
    from safeconf.pipeline import run_pipeline

    return run_pipeline(config)


def _run_train(config: Config, dataset: str, out: str, run_key: str, fresh: bool = False) -> dict:
    from safeconf.train import run_training

    return run_training(config, dataset, out, run_key=run_key, fresh=fresh)


def _run_sft(config: Config, confidence: str, out: str, question_ids: list[str] | None = None) -> dict:
    from safeconf.sft import build_sft

    counts = build_sft(confidence, out, config.sft, None if question_ids is None else set(question_ids))
    if not counts["examples"]["train"] or not counts["examples"]["val"]:
        raise ValueError(f"{out}: an empty split ({counts}); raise sft.val_fraction or use more questions")
    return {"counts": counts}


def _run_evaluate(config: Config, data: str, out: str, adapter: str = "", model: str | None = None) -> dict:
    from safeconf.evaluation.runner import run_evaluation

    return run_evaluation(config, data, out, model=model, adapter=adapter or None)


# What runs each stage, called as runner(config, **StagePlan.args), the training stages with run_key and fresh too;
# tests replace them with stubs.
RUNNERS: dict[str, Callable[..., dict]] = {"guard": _run_guard, "pipeline": _run_pipeline, "sft": _run_sft,
                                          "train": _run_train, "evaluate": _run_evaluate}


@dataclass
class StagePlan:
    """One stage's call: its runner's arguments, what it reads (inputs, hashed into the fingerprint), what it
    writes (cleared before a redo; `done` must exist for a finished stage) and the stages it reads from."""

    name: str
    config: Config
    args: dict
    inputs: dict
    outputs: list[str]
    done: str
    upstream: tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.inputs)

    @property
    def run_key(self) -> str | None:
        """The key naming a training stage's Ray Train run (run_key_of its inputs); None for the others."""
        return run_key_of(self.inputs, self.config) if self.name in TRAINING_STAGES else None

    def run(self, fresh: bool = False) -> dict:
        """Run the stage; fresh=True makes training start over instead of resuming its checkpoints."""
        args = {**self.args, "run_key": self.run_key, "fresh": fresh} if self.name in TRAINING_STAGES else self.args
        return RUNNERS[self.name](self.config, **args)

    def clear_outputs(self) -> None:
        for uri in self.outputs:
            io.delete(uri)



def guard_plan(config: Config) -> StagePlan | None:
    """Guard-tuning into OUT/guard, or None when guard.data is empty (the stage is off). Its inputs: the training
    settings it runs with (guard_train_config), the pool by content, and the calibration and held-out sets the
    pool is kept disjoint from."""
    from safeconf.guard import guard_dir, guard_train_config

    if not config.guard.data:
        return None
    out = io.normalise_uri(config.out)
    tuned = guard_train_config(config)
    pool = {"pool": spec_identity(config.guard.data), "limit": config.guard.limit,
            "val_fraction": config.guard.val_fraction, "split_seed": config.sft.seed,
            "kept_apart_from": {"data": spec_identity(config.data), "limit": config.limit,
                                "eval.data": spec_identity(config.eval.data)}}
    if config.guard.variants:  # only then: a pool of originals keeps the fingerprint it had before the setting
        pool["variants"] = {"per_question": config.guard.variants, "operators": list(config.mutation.operators),
                            "seed": config.mutation.seed}
    inputs = {"config": config_inputs(tuned, "guard"), "sft": pool, "snapshot_steps": tuned.train.snapshot_steps}
    folder = guard_dir(out)
    return StagePlan("guard", config, {"out": out}, inputs,
                     # not snapshots/: they belong to the Ray Train run, which a redo resumes (run_training clears
                     # them when it starts a run afresh)
                     outputs=[io.join(folder, p) for p in ("sft", "adapter", "merged", "rejects.parquet",
                                                           "train_summary.json", "guard_summary.json")],
                     done=io.join(folder, "guard_summary.json"))


def on_guard_model(plan: StagePlan, guard: StagePlan | None) -> StagePlan:
    """A stage that runs on the guard-tuned model: its model is identified by the guard stage's fingerprint, in
    its fingerprint and (for training) its run key, which derive from the inputs (the merged folder does not
    exist yet when the job is planned, and is rewritten by every redo of the guard stage)."""
    if guard is None:
        return plan
    plan.inputs["config"]["model.name"] = upstream("guard", guard.fingerprint)
    plan.upstream = tuple(s for s in STAGES if s == "guard" or s in plan.upstream)
    return plan


def stage_config(config: Config) -> Config:
    """The config the stages after guard-tuning run with: model.name is the guard-tuned model when the guard stage
    is on (its LoRA is merged, so SafeConf's own adapter goes on top of it)."""
    from safeconf.guard import guard_model

    if not config.guard.data:
        return config
    config = copy.deepcopy(config)
    config.model.name = guard_model(io.normalise_uri(config.out))
    return config


def pipeline_plan(config: Config) -> StagePlan:
    out = io.normalise_uri(config.out)
    return StagePlan("pipeline", config, {}, {"config": config_inputs(config, "pipeline")},
                     outputs=[io.join(out, p) for p in ("summary.json", "confidence", "sft", "rejects")],
                     done=io.join(out, "summary.json"))


def sft_plan(config: Config, run: str, out: str, question_ids: list[str] | None = None) -> StagePlan:
    """The SFT set of pipeline run `run` (its confidence table), for `question_ids` only (None: all), built with
    config.sft into OUT/sft. Its inputs: the pipeline's fingerprint (from its marker: the run must be finished), the
    sft settings and the questions; the counts go into its marker's summary (sft_counts)."""
    run, out = io.normalise_uri(run), io.normalise_uri(out)
    pipeline = read_marker(run, "pipeline")
    if pipeline is None:
        raise StageOrderError(f"{run}: its pipeline stage has not finished; the SFT set is built from its confidence table")
    ids = None if question_ids is None else sorted(question_ids)
    inputs = {"pipeline": pipeline["fingerprint"], "sft": dataclasses.asdict(config.sft),
              "questions": hashlib.sha256("\n".join(ids).encode()).hexdigest() if ids is not None else "all"}
    return StagePlan("sft", config, {"confidence": io.join(run, "confidence"), "out": io.join(out, "sft"),
                                     "question_ids": ids}, inputs,
                     outputs=[io.join(out, "sft")], done=io.join(out, "sft", "train.parquet"))


def sft_counts(out: str) -> dict:
    """The questions and examples per split of the SFT set an sft stage built into OUT (from its marker)."""
    marker = read_marker(io.normalise_uri(out), "sft")
    # markers written before the sft stage existed (experiments/shared_data_run.py's own) kept the counts at the top
    return marker["summary"]["counts"] if "summary" in marker else marker["counts"]


def train_plan(config: Config, dataset: str, out: str, sft=None) -> StagePlan:
    """Training on the SFT folder `dataset` into `out`; `sft` identifies the set (default: its files)."""
    dataset, out = io.normalise_uri(dataset), io.normalise_uri(out)
    sft = sft if sft is not None else sft_identity(dataset)
    return StagePlan("train", config, {"dataset": dataset, "out": out}, train_inputs(config, sft),
                     outputs=[io.join(out, p) for p in ("adapter", "merged", "train_summary.json")],
                     done=io.join(out, "adapter"), upstream=stages_read(sft))


def evaluation_data(config: Config, data: str | None = None, run: str | None = None) -> str:
    """The held-out questions evaluate reads: `data`, else eval.data, else the validation split the pipeline of
    run directory `run` held out (RUN/sft/val_questions.parquet). Never the training questions."""
    if data or config.eval.data:
        return data or config.eval.data
    if not run:
        raise ValueError("no held-out questions: give --data SPEC, eval.data=SPEC, or --run DIR (a run directory "
                         "whose sft/val_questions.parquet the pipeline held out)")
    return f"parquet:{val_questions(run)}"


def val_questions(run: str) -> str:
    return io.join(run, "sft", "val_questions.parquet")


def evaluate_plan(config: Config, data: str, out: str, adapter: str = "", model: str | None = None,
                  data_source=None, adapter_source=None) -> StagePlan:
    """Evaluation of `data` into `out` with `adapter` (empty: baselines only); the sources identify the data and
    the adapter (default: their files)."""
    out = io.normalise_uri(out)
    inputs = {"config": config_inputs(config, "evaluate"),
              "questions": data_source if data_source is not None else spec_identity(data),
              "adapter": adapter_source if adapter_source is not None else spec_identity(adapter, "model")}
    if model:
        inputs["config"]["model.name"] = spec_identity(model, "model")
    return StagePlan("evaluate", config, {"data": data, "out": out, "adapter": adapter, "model": model}, inputs,
                     outputs=[out], done=io.join(out, "metrics.json"),
                     upstream=stages_read(inputs["questions"], inputs["adapter"]))


def job_plans(config: Config) -> dict[str, StagePlan]:
    """The stages of jobs/full.py in one run directory (config.out), each reading what the one before wrote: the
    guard stage (when guard.data is set; absent otherwise) tunes the model the others use, train the pipeline's SFT
    set (or train.dataset), evaluate eval.data (or the pipeline's held-out split) with train's adapter."""
    out = io.normalise_uri(config.out)
    config = copy.deepcopy(config)
    config.out = out
    guard = guard_plan(config)
    config = stage_config(config)
    pipeline = on_guard_model(pipeline_plan(config), guard)
    if config.train.dataset:
        train = train_plan(config, config.train.dataset, io.join(out, "train"))
    else:
        train = train_plan(config, io.join(out, "sft"), io.join(out, "train"),
                           sft=upstream("pipeline", pipeline.fingerprint))
    train = on_guard_model(train, guard)
    data = evaluation_data(config, run=out)
    evaluate = on_guard_model(evaluate_plan(
        config, data, io.join(out, "eval"), adapter=io.join(out, "train", "adapter"),
        data_source=None if config.eval.data else upstream("pipeline", pipeline.fingerprint),
        adapter_source=upstream("train", train.fingerprint),
    ), guard)
    plans = {"pipeline": pipeline, "train": train, "evaluate": evaluate}
    return {"guard": guard, **plans} if guard else plans


# --- markers: OUT/stages/<stage>.json ---


def marker_path(out: str, stage: str) -> str:
    return io.join(out, "stages", f"{stage}.json")


def read_marker(out: str, stage: str) -> dict | None:
    path = marker_path(out, stage)
    return io.read_json(path) if io.exists(path) else None


class StageOrderError(ValueError):
    """A stage would read another stage's output that is missing or was made from other inputs."""


def redo_reason(plan: StagePlan, marker: dict | None, forced: bool) -> str | None:
    """Why the stage must run, or None when its marker says it is up to date."""
    if forced:
        return "--from asks to redo it"
    if marker is None:
        return "not run before"
    if "fingerprint" not in marker:
        return "its marker records no inputs (written by an older safeconf)"
    if marker["fingerprint"] != plan.fingerprint:
        changes = changed_inputs(marker.get("inputs") or {}, plan.inputs)
        return "inputs changed: " + ("; ".join(changes) if changes else "fingerprint differs")
    if not io.exists(plan.done):
        return f"its output {plan.done} is missing"
    return None


def check_upstream(plans: dict[str, StagePlan], stages: list[str], out: str) -> None:
    """Every stage to run that reads another stage's output, where that stage is not run now, finds it finished
    with the inputs the current config gives it; else StageOrderError saying what to run."""
    for name in stages:
        for up in plans[name].upstream if name in plans else ():
            if up in stages:
                continue
            marker = read_marker(out, up)
            reason = redo_reason(plans[up], marker, forced=False)
            if reason:
                raise StageOrderError(
                    f"stage '{name}' reads the output of stage '{up}', which is not up to date ({reason}); "
                    f"add {up} to --stages (or run without --stages)")


def run_job(config: Config, stages: list[str], from_stage: str | None = None,
            on_failure: Callable[[str, Exception], None] | None = None) -> dict:
    """Run `stages` (in pipeline order) of the run directory config.out, skipping those whose marker holds the
    current fingerprint. `from_stage` redoes it and the later ones afresh (outputs and markers cleared first;
    training starts over). Returns {stage: {"stage_seconds", "status": "ran" | "up to date", ...}}."""
    out = io.normalise_uri(config.out)
    stages = [s for s in STAGES if s in stages]
    plans = job_plans(config)
    forced = set(STAGES[STAGES.index(from_stage):]) & set(stages) if from_stage else set()
    check_upstream(plans, stages, out)
    for name in stages:  # --from: nothing of what it redoes survives, even if a stage fails before its turn
        if name in forced and name in plans:
            io.delete(marker_path(out, name))
            plans[name].clear_outputs()
    report = {}
    for name in stages:
        if name not in plans:  # the guard stage without guard.data
            report[name] = {"stage_seconds": 0.0, "status": "off"}
            continue
        report[name] = run_plan(plans[name], out, forced=name in forced, on_failure=on_failure)
    return report


def run_plan(plan: StagePlan, out: str, forced: bool = False,
             on_failure: Callable[[str, Exception], None] | None = None) -> dict:
    """Run one stage unless its marker in OUT/stages says it is up to date; record it when it finishes.
    Returns {"stage_seconds", "status": "ran" | "up to date", "reason"}."""
    name = plan.name
    marker = read_marker(out, name)
    reason = redo_reason(plan, marker, forced)
    if reason is None:
        log.info("stage %s up to date (fingerprint %s); skipped", name, plan.fingerprint[:12])
        return {"stage_seconds": marker.get("stage_seconds", 0.0), "status": "up to date"}
    log.info("stage %s: %s; running it (fingerprint %s)", name, reason, plan.fingerprint[:12])
    io.delete(marker_path(out, name))  # a redo that fails leaves no marker claiming the old outputs
    plan.clear_outputs()  # and nothing of the old run mixes with the new one (e.g. a stale train/merged)
    started = time.time()
    try:
        result = plan.run(fresh=forced)
    except Exception as error:
        if on_failure:
            on_failure(name, error)
        raise
    seconds = round(time.time() - started, 1)
    io.write_json(marker_path(out, name), {
        "stage": name, "fingerprint": plan.fingerprint, "inputs": plan.inputs, "reason": reason,
        "stage_seconds": seconds, "finished": time.time(),
        "summary": {k: v for k, v in result.items() if k != "config"},
    })
    log.info("stage %s done in %.0f s", name, seconds)
    return {"stage_seconds": seconds, "status": "ran", "reason": reason}
