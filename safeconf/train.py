"""LoRA fine-tuning of the judge on the SFT set: Ray Train (TorchTrainer) + DeepSpeed ZeRO 2/3 + PEFT.

driver   validate OUT/sft/{train,val}.parquet (a bad row stops the run here, naming file, row and column)
         -> Ray Data: tokenize with the chat template, skip over-long rows (counted, never cut) -> TorchTrainer
worker   base model + LoRA -> deepspeed.initialize on Ray's process group -> epochs of a seeded, deterministic
         plan of micro-batches -> ray.train.report every log_every steps, checkpoints every checkpoint_every
         steps and at each epoch end (DeepSpeed shards + the position in the data), validation loss per epoch
         -> the final checkpoint also holds the LoRA adapter, gathered from the ZeRO-3 partitions first
driver   OUT/adapter (PEFT, HF format) [+ OUT/merged] + OUT/train_summary.json

Resuming: the Ray Train run is named train.run_name + a key of its inputs (safeconf.stages.train_run_key: the
result-relevant config, the SFT set's identity, the checkpoint layout). A run restarted after a worker failure
(FailureConfig), or re-run with the same inputs and storage_path, loads the latest checkpoint and skips exactly
the optimizer steps already taken: the data order of an epoch is a permutation seeded by (seed, epoch), so the
plan is the same on every run. Other inputs (a new SFT set, another learning rate) get another run name, so an
old finished run is never restored for them; fresh=True removes the run's checkpoints and starts over.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from safeconf import io
from safeconf.config import Config, TrainConfig, config_from_dict
from safeconf.models import resolve_model
from safeconf.schema import DataFormatError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there
STATE_FILE = "train_state.json"  # position in the data + history, written by rank 0 into every checkpoint
ADAPTER_DIR = "adapter"
# Fault injection for tests and drills: the last rank fails once when it finishes this optimizer step.
FAIL_AT_STEP_ENV = "SAFECONF_FAIL_AT_STEP"
FAIL_MODE_ENV = "SAFECONF_FAIL_MODE"  # "raise" (default) or "exit" (the worker process dies)
FAIL_MARKER_ENV = "SAFECONF_FAIL_MARKER"  # marker file: the failure fires only while it does not exist


# --- the SFT set, validated on the driver ---


def _message_problem(messages) -> str | None:
    """Why one row's `messages` cannot be trained on, or None."""
    if not messages:
        return "no messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {i} has no role"
        if not isinstance(message.get("content"), str):
            return f"message {i} ({message['role']}) has no text content"
    if messages[-1]["role"] != "assistant":
        return f"the last message is from {messages[-1]['role']!r}, not the assistant (the last message is the target)"
    if not messages[-1]["content"].strip():
        return "empty target (the assistant message is empty)"
    if len(messages) < 2:
        return "no prompt before the assistant target"
    return None


def read_sft_file(uri: str, max_errors: int = 10) -> pa.Table:
    """The `messages` column of one SFT Parquet file, with a `row` index. Bad rows stop the run with an error
    naming the file, the row and the column (before any worker starts)."""
    fs, path = io.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: SFT file not found (`safeconf pipeline` writes OUT/sft/train.parquet and val.parquet)")
    schema = pq.read_schema(path, filesystem=fs)
    if "messages" not in schema.names:
        raise DataFormatError(
            f"{uri}: no 'messages' column (columns: {', '.join(schema.names)}); an SFT set needs "
            "messages = list of {role, content} whose last message is the assistant target"
        )
    table = pq.read_table(path, filesystem=fs, columns=["messages"])
    problems = []
    for row, messages in enumerate(table.column("messages").to_pylist()):
        problem = _message_problem(messages)
        if problem:
            problems.append(f"{uri}: row {row}, column 'messages': {problem}")
    if problems:
        shown = problems[:max_errors] + ([f"... and {len(problems) - max_errors} more"] if len(problems) > max_errors else [])
        raise DataFormatError(f"{len(problems)} bad row(s) in the SFT set:\n  " + "\n  ".join(shown))
    return table.append_column("row", pa.array(np.arange(table.num_rows), pa.int64()))


# --- tokenization: the chat template, loss on the target only ---


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message (<|im_end|>, <|eot_id|>, ...), so the model learns
    to stop after the target. Falls back to the EOS token."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "SAFECONF_TARGET"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that refuses the probe: use EOS
        text = ""
    after = text.split("SAFECONF_TARGET", 1)[1].rstrip("\n") if "SAFECONF_TARGET" in text else ""
    return after or (tokenizer.eos_token or "")


def encode_example(tokenizer, messages: list[dict], eot: str) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens). The prompt is the chat template with the generation prompt, exactly
    what the judge sees at inference; the target is the assistant text plus the end-of-turn token."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(messages[-1]["content"] + eot, add_special_tokens=False)["input_ids"]
    return list(prompt_ids) + list(target_ids), len(prompt_ids)


def tokenize_batch(batch: pa.Table, model_path: str, max_length: int) -> pa.Table:
    """Ray Data map: messages -> input_ids + prompt length; rows over max_length keep a skip reason instead."""
    tokenizer = load_tokenizer(model_path)
    eot = end_of_turn(tokenizer)
    ids_column, prompt_column, lengths, skips = [], [], [], []
    for messages in batch.column("messages").to_pylist():
        ids, prompt_tokens = encode_example(tokenizer, messages, eot)
        too_long = len(ids) > max_length
        ids_column.append([] if too_long else ids)
        prompt_column.append(prompt_tokens)
        lengths.append(len(ids))
        skips.append("too_long" if too_long else None)
    return pa.table(
        {
            "row": batch.column("row"),
            "input_ids": pa.array(ids_column, pa.list_(pa.int32())),
            "prompt_tokens": pa.array(prompt_column, pa.int32()),
            "num_tokens": pa.array(lengths, pa.int32()),
            "skip": pa.array(skips, pa.string()),
        }
    )


def _drop_skipped(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_null(batch.column("skip"))).drop_columns(["skip"])


def tokenize_split(table: pa.Table, model_path: str, max_length: int, rows_per_block: int = 2048):
    """(materialized Ray Dataset of the kept rows, counts with the skipped rows and why)."""
    import ray

    blocks = [table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)]
    tokenized = (
        ray.data.from_arrow(blocks)
        .map_batches(tokenize_batch, batch_format="pyarrow", batch_size=None,
                     fn_kwargs={"model_path": model_path, "max_length": max_length})
        .materialize()
    )
    skipped: dict[str, dict] = {}
    kept, tokens = 0, 0
    for batch in tokenized.select_columns(["row", "num_tokens", "skip"]).iter_batches(batch_format="pyarrow", batch_size=None):
        for row, num_tokens, skip in zip(*(batch.column(c).to_pylist() for c in ("row", "num_tokens", "skip"))):
            if skip is None:
                kept, tokens = kept + 1, tokens + num_tokens
                continue
            entry = skipped.setdefault(skip, {"count": 0, "rows": [], "num_tokens": [],
                                              "detail": f"longer than max_length={max_length} tokens: skipped, not cut"})
            entry["count"] += 1
            if len(entry["rows"]) < 20:  # the first rows, to find them in the file
                entry["rows"].append(row)
                entry["num_tokens"].append(num_tokens)
    # materialized again so the train workers read finished blocks and need no Ray Data CPU (2-core deadlock)
    dataset = tokenized.map_batches(_drop_skipped, batch_format="pyarrow", batch_size=None).materialize()
    dataset.context.enable_progress_bars = False  # workers read finished blocks in a blink: no bars in the logs
    return dataset, {"rows": table.num_rows, "kept": kept, "tokens": tokens, "skipped": skipped}


# --- the data plan: deterministic per (seed, epoch), the same on every rank count and every run ---


def plan_counts(num_rows: int, world_size: int, micro_batch_size: int, accumulation: int) -> tuple[int, int]:
    """(optimizer steps per epoch, examples left out of each epoch). Every rank takes num_rows // world_size
    examples (equal step counts keep the ZeRO collectives in step); a last step shorter than a full one is kept
    when it still has at least one example per micro-batch."""
    per_rank = num_rows // world_size
    per_step = micro_batch_size * accumulation
    steps, rest = divmod(per_rank, per_step)
    if rest >= accumulation:
        steps, rest = steps + 1, 0
    return steps, num_rows - world_size * per_rank + world_size * rest


def epoch_plan(num_rows: int, world_size: int, rank: int, micro_batch_size: int, accumulation: int,
               seed: int, epoch: int) -> list[list[np.ndarray]]:
    """This rank's optimizer steps of one epoch; each step is `accumulation` arrays of row positions."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)  # a new order each epoch, seeded
    per_rank = num_rows // world_size
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    per_step = micro_batch_size * accumulation
    steps, _ = plan_counts(num_rows, world_size, micro_batch_size, accumulation)
    return [np.array_split(mine[s * per_step:(s + 1) * per_step], accumulation) for s in range(steps)]


@dataclass
class Examples:
    """A tokenized split held by a worker, in file order (sorted by row, whatever order Ray Data delivered)."""

    ids: list
    prompt_tokens: np.ndarray
    rows: np.ndarray

    @classmethod
    def from_shard(cls, shard) -> "Examples":
        tables = list(shard.iter_batches(batch_format="pyarrow", batch_size=None))
        table = pa.concat_tables(tables) if tables else None
        if table is None or table.num_rows == 0:
            return cls([], np.zeros(0, np.int64), np.zeros(0, np.int64))
        table = table.sort_by("row")
        ids = [np.asarray(x, dtype=np.int64) for x in table.column("input_ids").to_pylist()]
        return cls(ids, table.column("prompt_tokens").to_numpy(), table.column("row").to_numpy())

    def __len__(self) -> int:
        return len(self.ids)


def collate(examples: Examples, positions, pad_token_id: int):
    """Right-padded tensors; labels are -100 on prompt and padding so the loss is on the target tokens only."""
    import torch

    seqs = [examples.ids[i] for i in positions]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for j, (seq, i) in enumerate(zip(seqs, positions)):
        n, p = len(seq), int(examples.prompt_tokens[i])
        input_ids[j, :n] = torch.from_numpy(seq)
        attention_mask[j, :n] = 1
        labels[j, p:n] = input_ids[j, p:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- DeepSpeed configuration, built in code ---


def training_precision(config: Config) -> str:
    """bf16 on GPUs (fp16 if the model is float16), fp32 on CPUs; DeepSpeed refuses fp16 on CPU, and so do we."""
    if config.train.use_gpu:
        return "fp16" if config.model.dtype == "float16" else "bf16"
    if config.model.dtype == "float16":
        raise ValueError("model.dtype=float16: fp16 training is not supported on CPU (DeepSpeed refuses it); "
                         "use bfloat16 or float32 (CPU training runs in fp32)")
    return "fp32"


def deepspeed_config(train: TrainConfig, world_size: int, precision: str) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = train.zero3_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather the LoRA weights ourselves
        if train.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation * world_size,
        "gradient_clipping": train.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0},
        # ZeRO-Offload with torch's AdamW: on CPUs there is nothing faster to offload to.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warm-up to the peak rate, then linear decay to zero at total_steps."""
    warmup = max(1, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


# --- the worker ---


def _rss_mb() -> float:
    """This process's peak resident memory (high-water mark), MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def build_model(model_path: str, train: TrainConfig, precision: str, ds_config: dict):
    """The base model with LoRA adapters; only the adapter weights are trainable. Under ZeRO-3 the base weights
    are partitioned while they load (HfDeepSpeedConfig), so no rank ever holds the whole model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    keep_alive = None
    if train.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # from_pretrained sees it (a weak reference) while it lives
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.config.use_cache = False
    torch.manual_seed(train.seed)  # the same LoRA initialisation on every rank and every run
    lora = LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=list(train.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora), keep_alive


def export_adapter(engine, out_dir: str, rank: int) -> None:
    """Write the PEFT adapter from rank 0. Under ZeRO-3 the LoRA matrices are partitioned (each rank holds a
    slice, the module an empty placeholder): gather them first, or save_pretrained writes empty tensors.
    GatheredParameters is a collective (every rank enters) and does nothing for unpartitioned parameters."""
    import deepspeed
    import torch

    model = engine.module
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
        if rank == 0:
            state = {name: p.detach().to("cpu", torch.float32).clone() for name, p in trainable}
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)


def _fault_injection(loop: dict, step: int, rank: int, world_size: int) -> None:
    if loop.get("fail_at_step") != step or rank != world_size - 1 or os.path.exists(loop["fail_marker"]):
        return
    with open(loop["fail_marker"], "w") as marker:
        marker.write(f"failed at step {step}\n")
    if loop.get("fail_mode") == "exit":
        os._exit(1)
    raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")


def train_loop(loop: dict) -> dict:
    """Ray Train worker function (every rank runs it)."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    config = config_from_dict(loop["config"])
    train = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not train.use_gpu:  # Ray starts workers with OMP_NUM_THREADS = their CPU reservation; size to the node instead
        torch.set_num_threads(train.cpu_threads or max(1, len(os.sched_getaffinity(0)) // context.get_local_world_size()))
    # the root logger reaches the driver once (Ray Train tees print() into it, so printing would show twice)
    say = (lambda text: logging.getLogger().info(f"[safeconf train] {text}")) if rank == 0 else (lambda text: None)

    # DeepSpeed adopts the process group Ray Train set up (gloo on CPUs, NCCL on GPUs); doing it before the model
    # loads lets ZeRO-3 partition the weights as they load across the right world size.
    deepspeed.init_distributed(dist_backend=dist.get_backend())

    train_rows = Examples.from_shard(ray.train.get_dataset_shard("train"))
    val_rows = Examples.from_shard(ray.train.get_dataset_shard("val"))
    ds_config = deepspeed_config(train, world, loop["precision"])
    model, keep_alive = build_model(loop["model_path"], train, loop["precision"], ds_config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=train.learning_rate, weight_decay=train.weight_decay)
    total_steps = loop["total_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, train.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    del keep_alive
    device = engine.device
    say(f"{world} workers, ZeRO-{train.zero_stage}, {loop['precision']}, {torch.get_num_threads()} torch threads per "
        f"worker (CPUs {sorted(os.sched_getaffinity(0))}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); "
        f"{len(train_rows)} train / {len(val_rows)} val examples, {total_steps} steps")

    # Position and history; a checkpoint overrides them.
    state = {"global_step": 0, "epoch": 0, "steps_done_in_epoch": 0, "train_loss": [], "val_loss": [],
             "starts": [], "tokens": 0, "train_seconds": 0.0, "final": False}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            with open(os.path.join(folder, STATE_FILE)) as f:
                state.update(json.load(f))
            # frozen base weights are not in the checkpoint: they come from the base model, as they did at start
            load_path, _ = engine.load_checkpoint(folder, tag=state["tag"], load_module_strict=False)
            if load_path is None:
                raise RuntimeError(f"could not load the DeepSpeed checkpoint {state['tag']} from {folder}")
    start_step = state["global_step"]
    state["starts"].append(start_step)
    if start_step:
        say(f"resumed from step {start_step} (epoch {state['epoch']}, {state['steps_done_in_epoch']} steps into it)")

    def all_sum(values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)  # NCCL reduces only GPU tensors
        dist.all_reduce(tensor)
        return tensor.tolist()

    def evaluate() -> float | None:
        """Token-weighted validation loss over the whole val set. Every rank runs the same number of forward
        passes (ZeRO-3 gathers parameters in each), padding with a weightless batch when it runs out."""
        if len(val_rows) == 0:
            return None
        mine = np.arange(rank, len(val_rows), world)
        batches = math.ceil(math.ceil(len(val_rows) / world) / train.micro_batch_size)
        loss_sum, token_sum = 0.0, 0.0
        engine.eval()
        with torch.no_grad():
            for positions in np.array_split(mine, batches):
                weight = 1.0 if len(positions) else 0.0
                batch = collate(val_rows, positions if len(positions) else [0], loop["pad_token_id"])
                batch = {k: v.to(device) for k, v in batch.items()}
                tokens = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                loss = engine(**batch).loss.float().item()
                loss_sum += weight * loss * tokens
                token_sum += weight * tokens
        engine.train()
        loss_sum, token_sum = all_sum([loss_sum, token_sum])
        return loss_sum / max(token_sum, 1.0)

    def save_checkpoint(metrics: dict, final: bool) -> None:
        folder = tempfile.mkdtemp(prefix="safeconf-ckpt-")
        tag = f"step{state['global_step']:06d}"
        # every rank writes its ZeRO shard; Ray merges the rank folders into one checkpoint in storage
        engine.save_checkpoint(folder, tag=tag, exclude_frozen_parameters=True)
        if final:
            export_adapter(engine, os.path.join(folder, ADAPTER_DIR), rank)
        if rank == 0:
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({**state, "tag": tag, "final": final}, f)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        shutil.rmtree(folder, ignore_errors=True)

    plans = {}
    step_records = []  # (this rank's tokens, seconds) of every step of this attempt, for a robust median
    window = {"loss": 0.0, "micro": 0, "tokens": 0, "seconds": 0.0}
    state.setdefault("log_seconds", 0.0)  # time in logging reports (part of training cost; eval and checkpoints are not)
    engine.train()
    done = state["final"] or state["global_step"] >= total_steps
    epoch = state["epoch"] if state["steps_done_in_epoch"] < loop["steps_per_epoch"] else state["epoch"] + 1
    skip_steps = state["steps_done_in_epoch"] if epoch == state["epoch"] else 0
    while not done and epoch < train.epochs:
        plan = plans.setdefault(epoch, epoch_plan(len(train_rows), world, rank, train.micro_batch_size,
                                                  train.gradient_accumulation, train.seed, epoch))
        for step_in_epoch in range(skip_steps, len(plan)):
            started = time.perf_counter()
            step_tokens = 0
            for positions in plan[step_in_epoch]:
                batch = {k: v.to(device) for k, v in collate(train_rows, positions, loop["pad_token_id"]).items()}
                loss = engine(**batch).loss
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer and the LR schedule at the accumulation boundary
                window["loss"] += loss.item()
                window["micro"] += 1
                step_tokens += int(batch["attention_mask"].sum())
            state["global_step"] += 1
            state.update(epoch=epoch, steps_done_in_epoch=step_in_epoch + 1)
            _fault_injection(loop, state["global_step"], rank, world)
            seconds = time.perf_counter() - started
            window["seconds"] += seconds
            window["tokens"] += step_tokens
            step_records.append((step_tokens, seconds))

            step = state["global_step"]
            epoch_end = step_in_epoch == len(plan) - 1
            done = step >= total_steps or (epoch_end and epoch == train.epochs - 1)
            do_checkpoint = done or epoch_end or step % train.checkpoint_every == 0
            if not (do_checkpoint or step % train.log_every == 0):
                continue
            # every rank reaches this point at the same steps, so every rank reports the same number of times
            log_started = time.perf_counter()
            loss_sum, micro, tokens, seconds = all_sum([window["loss"], window["micro"], window["tokens"],
                                                        window["seconds"]])
            seconds /= world
            state["tokens"] += int(tokens)
            state["train_seconds"] += seconds
            metrics = {"step": step, "epoch": epoch + (step_in_epoch + 1) / len(plan), "loss": loss_sum / micro,
                       "learning_rate": scheduler.get_last_lr()[0], "tokens_per_s": tokens / max(seconds, 1e-9),
                       "total_steps": total_steps}
            state["train_loss"].append([step, metrics["loss"]])
            if epoch_end:
                metrics["val_loss"] = evaluate()
                state["val_loss"].append([epoch + 1, metrics["val_loss"]])
            rss = [0.0] * world
            rss[rank] = _rss_mb()
            metrics["peak_rss_mb"] = state["peak_rss_mb"] = all_sum(rss)
            say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                         if k != "peak_rss_mb"))
            if do_checkpoint:
                save_checkpoint(metrics, final=done)
            else:
                ray.train.report(metrics)
                state["log_seconds"] += time.perf_counter() - log_started
            window = {"loss": 0.0, "micro": 0, "tokens": 0, "seconds": 0.0}
            if done:
                break
        epoch, skip_steps = epoch + 1, 0

    step_tokens = all_sum([float(t) for t, _ in step_records]) if step_records else []
    step_rates = [t / s for t, (_, s) in zip(step_tokens, step_records)]  # all ranks, over rank 0's step time
    result = {**state, "start_step": start_step, "world_size": world,
              "median_step_tokens_per_s": float(np.median(step_rates)) if step_rates else None}
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # ZeRO-3 can abort at interpreter exit otherwise
    return result if rank == 0 else None


# --- the driver ---


def _publish(local_dir: str, uri: str) -> None:
    """Copy a local folder to a local path or object store URI, replacing what was there."""
    fs, path = io.filesystem(uri)
    fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


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
    run_key: safeconf.stages.train_run_key of this config and the SFT files): the same key resumes from the latest
    checkpoint (a finished run is restored as it ended); `fresh` removes that run's checkpoints first."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from safeconf.pipeline import init_ray

    started = time.time()
    train = config.train
    if train.offload_params and train.zero_stage != 3:
        raise ValueError("train.offload_params needs train.zero_stage=3 (ZeRO-2 does not partition parameters)")
    precision = training_precision(config)
    out = io.normalise_uri(out_uri)
    dataset = io.normalise_uri(dataset_uri)
    # validate before anything starts: a bad row is an error naming file, row and column, not a worker crash
    tables = {split: read_sft_file(io.join(dataset, f"{split}.parquet")) for split in SPLITS}
    model_path = resolve_model(config.model.name, config.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    init_ray(config.ray_address)
    datasets, examples = {}, {}
    for split in SPLITS:
        datasets[split], examples[split] = tokenize_split(tables[split], model_path, train.max_length)
        for reason, entry in examples[split]["skipped"].items():
            log.warning("%s.parquet: skipped %d rows (%s), e.g. rows %s", split, entry["count"], entry["detail"],
                        entry["rows"][:5])
    steps_per_epoch, left_out = plan_counts(examples["train"]["kept"], train.num_workers, train.micro_batch_size,
                                            train.gradient_accumulation)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{dataset}/train.parquet: {examples['train']['kept']} usable examples are too few for one step of "
            f"{train.num_workers} workers x gradient_accumulation {train.gradient_accumulation} (at least one "
            "example per micro-batch on every worker)"
        )
    total_steps = steps_per_epoch * train.epochs
    if train.max_steps:
        total_steps = min(total_steps, train.max_steps)

    from safeconf.stages import sft_identity, train_run_key, train_run_name

    storage = io.normalise_uri(train.storage_path) if train.storage_path else io.join(out, "checkpoints")
    if "://" not in storage:
        os.makedirs(storage, exist_ok=True)
    run_key = run_key or train_run_key(config, sft_identity(dataset))
    run_name = train_run_name(config, run_key)
    run_fs, run_path = io.filesystem(io.join(storage, run_name))
    found = run_fs.get_file_info(run_path).type != pafs.FileType.NotFound
    if found and fresh:
        run_fs.delete_dir(run_path)
    log.info("Ray Train run %s in %s: %s", run_name, storage,
             "old checkpoints removed, starting over" if found and fresh
             else "resuming from its checkpoints (same inputs)" if found else "new run")
    # ray.train.report waits for the controller's poll; its default 2 s interval would dominate short steps
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": 1} if train.use_gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.to_dict(), "model_path": model_path, "precision": precision, "pad_token_id": pad_token_id,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, **_fault_settings(run_name),
        },
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets=datasets,
        # every worker reads the whole (small) tokenized set and takes its seeded slice: a deterministic data
        # order is what lets a resumed run skip exactly the examples already trained on
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    final = result.return_value or {}

    adapter_uri = io.join(out, ADAPTER_DIR)
    merged_uri = io.join(out, "merged") if train.merge else None
    with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(folder, STATE_FILE)) as f:
            state = json.load(f)
        adapter_local = os.path.join(scratch, ADAPTER_DIR)
        shutil.copytree(os.path.join(folder, ADAPTER_DIR), adapter_local)
        tokenizer.save_pretrained(adapter_local)  # the adapter folder is self-contained for serving
        _publish(adapter_local, adapter_uri)
        if merged_uri:
            merged_local = os.path.join(scratch, "merged")
            merge_adapter(model_path, adapter_local, merged_local, config.model.dtype)
            _publish(merged_local, merged_uri)
    state = {**state, **final}

    summary = {
        "model": model_path,
        "dataset": dataset,
        "steps": state["global_step"],
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": state["global_step"] / steps_per_epoch,
        "start_step": state["starts"][-1],
        "starts": state["starts"],
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
        "examples": {**examples, "left_out_per_epoch": left_out},
        "num_workers": train.num_workers,
        "zero_stage": train.zero_stage,
        "precision": precision,
        "adapter": adapter_uri,
        "merged": merged_uri,
        "checkpoint": result.checkpoint.path,
        "run": {"name": run_name, "storage_path": storage, "key": run_key, "fresh": bool(fresh),
                "resumed": found and not fresh},
        "seconds": round(time.time() - started, 1),
        "config": config.to_dict()["train"],
    }
    io.write_json(io.join(out, "train_summary.json"), summary)
    return summary
