"""The driver of a training run: validate and tokenize the SFT set, start the Ray Train run, publish the adapter.

driver   validate OUT/sft/{train,val}.parquet (a bad row stops the run here, naming file, row and column)
         -> Ray Data: tokenize with the chat template in the seeded stream order, skip over-long rows (counted,
            never cut) -> TorchTrainer, each worker streaming the set in windows (safeconf.train.data)
worker   safeconf.train.worker
driver   OUT/adapter (PEFT, HF format) [+ OUT/merged] + OUT/train_summary.json

Resuming: the Ray Train run is named train.run_name + a key of its inputs (safeconf.fingerprints.train_run_key: the
result-relevant config, the SFT set's identity, the checkpoint layout). A run restarted after a worker failure
(FailureConfig), or re-run with the same inputs and storage_path, loads the latest checkpoint and skips exactly
the optimizer steps already taken (the plan is a function of the seed, the epoch and the data). Other inputs (a
new SFT set, another learning rate) get another run name, so an old finished run is never restored for them;
fresh=True removes the run's checkpoints and starts over.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid

import pyarrow.fs as pafs

from safeconf import io
from safeconf.config import Config
from safeconf.fingerprints import sft_identity, train_run_key, train_run_name
from safeconf.models import cpu_has_bf16, resolve_model
from safeconf.train.data import SPLITS, Plan, load_tokenizer, read_sft_file, stream_order, tokenize_split
from safeconf.train.worker import ADAPTER_DIR, FAIL_AT_STEP_ENV, FAIL_MARKER_ENV, FAIL_MODE_ENV, STATE_FILE, train_loop

log = logging.getLogger(__name__)


def worker_resources(train) -> dict:
    """Ray resources of one Ray Train worker (ScalingConfig.resources_per_worker); safeconf.cluster_check reads
    this."""
    return {"CPU": train.cpus_per_worker} | ({"GPU": 1} if train.use_gpu else {})


def training_precision(config: Config) -> str:
    """fp32, bf16 or fp16 for train.precision ('auto': bf16 on GPUs, fp16 if the model is float16; on CPUs bf16
    where the CPU has native bf16, decided on the driver's node, else fp32). DeepSpeed refuses fp16 on CPU, and so
    do we."""
    train = config.train
    if not train.use_gpu and (config.model.dtype == "float16" or train.precision == "fp16"):
        raise ValueError("fp16 training is not supported on CPU (DeepSpeed refuses it); use train.precision=bf16 or "
                         "fp32 (and model.dtype bfloat16 or float32)")
    if train.precision != "auto":
        return train.precision
    if train.use_gpu:
        return "fp16" if config.model.dtype == "float16" else "bf16"
    return "bf16" if cpu_has_bf16() else "fp32"


def merge_adapter(model_path: str, adapter_dir: str, out_dir: str, dtype: str) -> None:
    """Base weights + LoRA merged into one HF folder (with the tokenizer) that transformers and vLLM load."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.to(getattr(torch, dtype)).save_pretrained(out_dir)
    load_tokenizer(model_path).save_pretrained(out_dir)


def _fault_settings(run_name: str) -> dict:
    step = os.environ.get(FAIL_AT_STEP_ENV)
    if not step:
        return {}
    # a fresh marker per run_training call unless one is given: the failure fires once per call, not once per attempt
    marker = os.environ.get(FAIL_MARKER_ENV) or os.path.join(tempfile.gettempdir(),
                                                             f"safeconf-fail-{run_name}-{uuid.uuid4().hex[:8]}")
    log.warning("fault injection: the last worker fails once at step %s (marker %s)", step, marker)
    return {"fail_at_step": int(step), "fail_mode": os.environ.get(FAIL_MODE_ENV, "raise"), "fail_marker": marker}


def run_training(config: Config, dataset_uri: str, out_uri: str, run_key: str = "", fresh: bool = False) -> dict:
    """LoRA fine-tune `config.model.name` on the SFT set in `dataset_uri` (train.parquet, val.parquet) with Ray Train
    and DeepSpeed; write OUT/adapter (PEFT), OUT/merged (with train.merge) and OUT/train_summary.json; return the
    summary. The Ray Train run is named train.run_name-<first 12 hex digits of run_key> in the storage (default
    run_key: safeconf.fingerprints.train_run_key of this config and the SFT files): the same key resumes from the
    latest checkpoint (a finished run is restored as it ended); `fresh` removes that run's checkpoints first."""
    from safeconf.ray_utils import init_ray

    started = time.time()
    train = config.train
    precision = training_precision(config)
    out, dataset = io.normalise_uri(out_uri), io.normalise_uri(dataset_uri)
    # validate before anything starts: a bad row is an error naming file, row and column, not a worker crash
    tables = {split: read_sft_file(io.join(dataset, f"{split}.parquet")) for split in SPLITS}
    model_path = resolve_model(config.model.name, config.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    init_ray(config.ray_address)
    datasets, examples = tokenised_splits(tables, model_path, train)
    steps = step_counts(train, examples["train"]["kept"], dataset)
    run = prepare_run(config, out, dataset, run_key, fresh)
    loop_config = {"config": config.to_dict(), "model_path": model_path, "precision": precision,
                   "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                   else tokenizer.eos_token_id,
                   "steps_per_epoch": steps["steps_per_epoch"], "total_steps": steps["total_steps"],
                   **_fault_settings(run["name"]), "examples": {split: examples[split]["kept"] for split in SPLITS},
                   "snapshot_uri": io.join(out, "snapshots")}
    result = fit(train, run, datasets, loop_config)
    exported = export_model(result, config, out, model_path, tokenizer, precision)
    summary = training_summary(config, model_path, dataset, steps, examples, run, exported, result, precision)
    summary["seconds"] = round(time.time() - started, 1)
    io.write_json(io.join(out, "train_summary.json"), summary)
    return summary


def tokenised_splits(tables: dict, model_path: str, train) -> tuple[dict, dict]:
    """({split: tokenized Ray Dataset}, {split: example counts, skipped rows with their reasons}), each split in
    its seeded stream order."""
    datasets, examples = {}, {}
    for split in SPLITS:
        ordered = stream_order(tables[split], train.seed)
        datasets[split], examples[split] = tokenize_split(ordered, model_path, train.max_length)
        for reason, entry in examples[split]["skipped"].items():
            log.warning("%s.parquet: skipped %d rows (%s), e.g. rows %s", split, entry["count"], entry["detail"],
                        entry["rows"][:5])
    return datasets, examples


def step_counts(train, kept: int, dataset: str) -> dict:
    """Optimizer steps per epoch and in all (train.max_steps caps them), and the examples an epoch leaves out."""
    plan = Plan(train.num_workers, train.micro_batch_size, train.gradient_accumulation, train.group_window, train.seed)
    steps_per_epoch, left_out = plan.epoch_counts(kept)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{dataset}/train.parquet: {kept} usable examples are too few for one step of "
            f"{train.num_workers} workers x gradient_accumulation {train.gradient_accumulation} (at least one "
            "example per micro-batch on every worker)"
        )
    total_steps = steps_per_epoch * train.epochs
    if train.max_steps:
        total_steps = min(total_steps, train.max_steps)
    return {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "left_out": left_out}


def prepare_run(config: Config, out: str, dataset: str, run_key: str, fresh: bool) -> dict:
    """The Ray Train run's name, storage and key; with `fresh` its old checkpoints go. Snapshots of another (or a
    restarted) run are removed: they are not this run's learning curve."""
    train = config.train
    storage = io.normalise_uri(train.storage_path) if train.storage_path else io.join(out, "checkpoints")
    if "://" not in storage:
        os.makedirs(storage, exist_ok=True)
    run_key = run_key or train_run_key(config, sft_identity(dataset))
    run_name = train_run_name(config, run_key)
    run_fs, run_path = io.filesystem(io.join(storage, run_name))
    found = run_fs.get_file_info(run_path).type != pafs.FileType.NotFound
    if found and fresh:
        run_fs.delete_dir(run_path)
    if fresh or not found:
        io.delete(io.join(out, "snapshots"))
    log.info("Ray Train run %s in %s: %s", run_name, storage,
             "old checkpoints removed, starting over" if found and fresh
             else "resuming from its checkpoints (same inputs)" if found else "new run")
    return {"name": run_name, "storage_path": storage, "key": run_key, "fresh": bool(fresh),
            "resumed": found and not fresh}


def fit(train, run: dict, datasets: dict, loop_config: dict):
    """TorchTrainer.fit of train_loop across train.num_workers workers; a worker group that cannot be placed in
    train.start_timeout_s becomes an error naming the settings."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # ray.train.report waits for the controller's poll; its default 2 s interval would dominate short steps
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Ray Train passes its RAY_TRAIN_* variables on to its controller; a worker group that cannot be placed in this
    # time fails the attempt, and controller_failure_limit bounds the retries (Ray's default: without end).
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(train.start_timeout_s)
    resources = worker_resources(train)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources,
                                     placement_strategy=train.placement_strategy),
        run_config=RunConfig(
            name=run["name"],
            storage_path=run["storage_path"],
            failure_config=FailureConfig(max_failures=train.max_failures, controller_failure_limit=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets=datasets,
        # Every worker streams the whole tokenized set in windows and keeps its share of each: a worker holds one
        # window, and the split is a function of the seed, not of which worker asked first (streaming_split's
        # dynamic split), which is what lets a resumed run skip exactly the examples already trained on.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    try:
        return trainer.fit()
    except Exception as error:
        if "worker group startup timed out" not in str(error):
            raise
        # Ray's text points at its environment variable, which this driver sets from the config
        raise RuntimeError(
            f"Ray Train could not place {train.num_workers} workers of {resources} each "
            f"({train.placement_strategy}) within train.start_timeout_s={train.start_timeout_s:g} s, "
            f"{train.max_failures + 1} attempts: no node has room for them, or the autoscaler did not add one in "
            "time. Raise train.start_timeout_s, or fit train.cpus_per_worker / train.use_gpu to the cluster's node "
            "types (python -m safeconf.cluster_check CLUSTER CONFIG)") from error


def export_model(result, config: Config, out: str, model_path: str, tokenizer, precision: str) -> dict:
    """The final checkpoint's adapter (with the tokenizer: self-contained for serving) to OUT/adapter, merged into
    the model in OUT/merged with train.merge; {"adapter", "merged", "state": the training state it ended in}."""
    adapter_uri = io.join(out, ADAPTER_DIR)
    merged_uri = io.join(out, "merged") if config.train.merge else None
    with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        adapter_local = os.path.join(scratch, ADAPTER_DIR)
        shutil.copytree(os.path.join(folder, ADAPTER_DIR), adapter_local)
        tokenizer.save_pretrained(adapter_local)
        io.publish_dir(adapter_local, adapter_uri)
        if merged_uri:
            merged_local = os.path.join(scratch, "merged")
            # model.dtype 'auto' stores what training computed in: bf16 where it trained in bf16 (as the embedded
            # model and most published checkpoints are), else float32, whose LoRA delta bf16 rounding would blur
            dtype = config.model.dtype if config.model.dtype != "auto" else (
                "float32" if precision == "fp32" else "bfloat16")
            merge_adapter(model_path, adapter_local, merged_local, dtype)
            io.publish_dir(merged_local, merged_uri)
    return {"adapter": adapter_uri, "merged": merged_uri, "state": {**state, **(result.return_value or {})}}


def training_summary(config: Config, model_path: str, dataset: str, steps: dict, examples: dict, run: dict,
                     exported: dict, result, precision: str) -> dict:
    """OUT/train_summary.json: steps, losses, tokens/s, memory, where each rank ran, the run and its outputs."""
    train, state = config.train, exported["state"]
    return {
        "model": model_path,
        "dataset": dataset,
        "steps": state["global_step"],
        "total_steps": steps["total_steps"],
        "steps_per_epoch": steps["steps_per_epoch"],
        "epochs": state["global_step"] / steps["steps_per_epoch"],
        "start_step": state["starts"][-1],
        "starts": state["starts"],  # the step each attempt started from: more than one = resumed from a checkpoint
        "attempts": len(state["starts"]),
        "final_train_loss": state["train_loss"][-1][1] if state["train_loss"] else None,
        "train_loss": state["train_loss"],
        "val_loss_per_epoch": [loss for _, loss in state["val_loss"]],
        "train_tokens": state["tokens"],
        # tokens (prompt + target, no padding) over the time in training steps and logging reports, all workers
        "tokens_per_s": (state["tokens"] / (state["train_seconds"] + state.get("log_seconds", 0.0))
                         if state["train_seconds"] else None),
        # the median over this attempt's steps: robust to a machine that is busy with other work now and then
        "median_step_tokens_per_s": state.get("median_step_tokens_per_s"),
        "peak_rss_mb_per_worker": state.get("peak_rss_mb"),
        # resident memory after loading, after DeepSpeed's set-up and at the last report, anonymous vs file-backed
        "memory_mb_per_worker": state.get("memory_mb_per_worker"),
        "examples": {**examples, "left_out_per_epoch": steps["left_out"]},
        "num_workers": train.num_workers,
        "worker_nodes": state.get("worker_nodes"),  # the Ray node id of each rank, in rank order (last attempt)
        "zero_stage": train.zero_stage,
        "precision": state.get("precision", precision),  # as the workers trained (fp16 on GPUs without bf16)
        "adapter": exported["adapter"],
        "merged": exported["merged"],
        "checkpoint": result.checkpoint.path,
        "run": run,
        "config": config.to_dict()["train"],
    }
