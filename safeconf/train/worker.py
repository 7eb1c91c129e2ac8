"""What every Ray Train worker runs: the model with LoRA under DeepSpeed ZeRO, the optimizer steps of the plan,
reports, checkpoints (DeepSpeed shards + the position in the data) and the adapter export."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time

import numpy as np

from safeconf import io
from safeconf.config import TrainConfig, config_from_dict
from safeconf.train.data import Plan, causal_lm_loss, collate, stream_windows

STATE_FILE = "train_state.json"  # position in the data + history, written by rank 0 into every checkpoint
ADAPTER_DIR = "adapter"
# Fault injection for tests and drills: the last rank fails once when it finishes this optimizer step.
FAIL_AT_STEP_ENV = "SAFECONF_FAIL_AT_STEP"
FAIL_MODE_ENV = "SAFECONF_FAIL_MODE"  # "raise" (default) or "exit" (the worker process dies)
FAIL_MARKER_ENV = "SAFECONF_FAIL_MARKER"  # marker file: the failure fires only while it does not exist
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def deepspeed_config(train: TrainConfig, world_size: int, precision: str) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = train.zero3_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we gather the LoRA weights ourselves
        zero["stage3_max_live_parameters"] = train.zero3_max_live_parameters
        zero["stage3_max_reuse_distance"] = train.zero3_max_live_parameters
        zero["stage3_prefetch_bucket_size"] = min(50_000_000, train.zero3_max_live_parameters // 2)
        if train.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation * world_size,
        "gradient_clipping": train.gradient_clipping,
        "zero_optimization": zero,
        # bf16/fp16: the model computes in 16 bits, DeepSpeed keeps fp32 master weights of the trainable ones
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


def worker_precision(precision: str, train: TrainConfig) -> str:
    """The precision this worker trains in: the driver's choice (safeconf.train.driver.training_precision), except
    that train.precision=auto on a GPU without bf16 (pre-Ampere: V100, T4) trains in fp16. Decided on the worker:
    the driver of a cluster job usually runs on a head node without a GPU."""
    from safeconf.models import gpu_has_bf16

    if train.use_gpu and train.precision == "auto" and precision == "bf16" and not gpu_has_bf16():
        return "fp16"
    return precision


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
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, TORCH_DTYPES[precision]))
    model.config.use_cache = False
    if train.gradient_checkpointing:
        # non-reentrant: gradients reach the LoRA matrices although the frozen inputs need none, and the RNG state
        # (LoRA dropout) is replayed in the recomputation, so the gradients are those of the plain pass
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(train.seed)  # the same LoRA initialisation on every rank and every run
    lora = LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=list(train.lora_target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora), keep_alive


def export_adapter(engine, out_dir: str, rank: int) -> None:
    """Write the PEFT adapter (fp32) from rank 0. Under ZeRO-3 the LoRA matrices are partitioned (each rank holds
    a slice, the module an empty placeholder): gather them first, or save_pretrained writes empty tensors.
    GatheredParameters is a collective (every rank enters) and does nothing for unpartitioned parameters."""
    import deepspeed
    import torch

    from deepspeed.utils import safe_get_full_fp32_param

    model = engine.module
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    # the fp32 master weights where DeepSpeed keeps them (bf16/fp16 and ZeRO-3: every rank takes part), else the
    # parameter itself (fp32 under ZeRO-2)
    masters = [safe_get_full_fp32_param(p) for _, p in trainable]
    with deepspeed.zero.GatheredParameters([p for (_, p), m in zip(trainable, masters) if m is None], modifier_rank=None):
        if rank == 0:
            state = {name: (p if m is None else m).detach().to("cpu", torch.float32).clone()
                     for (name, p), m in zip(trainable, masters)}
            model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)


def _fault_injection(loop: dict, step: int, rank: int, world_size: int) -> None:
    if loop.get("fail_at_step") != step or rank != world_size - 1 or os.path.exists(loop["fail_marker"]):
        return
    with open(loop["fail_marker"], "w") as marker:
        marker.write(f"failed at step {step}\n")
    if loop.get("fail_mode") == "exit":
        os._exit(1)
    raise RuntimeError(f"injected failure at step {step} ({FAIL_AT_STEP_ENV})")


def _release_freed_blocks() -> None:
    """Fix glibc's mmap threshold at 1 MB, so that freed tensors above it go back to the system. ZeRO-3 gathers
    and frees whole layers at every step; with glibc's default (a threshold that rises to the largest block freed)
    those blocks come from the heap and stay resident once freed, and a ZeRO-3 worker ends up holding as much as a
    ZeRO-2 one (measured in BENCHMARKS.md, "ZeRO-2 vs ZeRO-3 memory")."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name and "libc.so" in name:  # glibc or compatible; elsewhere nothing to set
        ctypes.CDLL(name).mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD


def _memory_now_mb() -> dict:
    """This process's resident memory now and its high-water mark so far, MB; now split as the kernel counts
    it: anonymous (tensors, heap) and file-backed (mmapped safetensors, libraries: page cache that every process
    mapping the file shares, so a peak RSS overstates what a worker alone costs)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "VmHWM": "peak"}
    memory = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in fields:
                memory[fields[key]] = round(int(value.split()[0]) / 1024)
    return memory


class Worker:
    """One rank's run: set up, restore, train the plan's steps, validate, report, checkpoint."""

    def __init__(self, loop: dict):
        import deepspeed
        import ray.train
        import torch
        import torch.distributed as dist

        self.loop = loop
        self.config = config_from_dict(loop["config"])
        self.train = train = self.config.train
        self.snapshot_steps = {int(step) for step in train.snapshot_steps}
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        if not train.use_gpu:  # Ray starts workers with OMP_NUM_THREADS = their CPU reservation; size to the node
            torch.set_num_threads(train.cpu_threads or max(1, len(os.sched_getaffinity(0)) // context.get_local_world_size()))
        # DeepSpeed adopts the process group Ray Train set up (gloo on CPUs, NCCL on GPUs); doing it before the
        # model loads lets ZeRO-3 partition the weights as they load across the right world size.
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.plan = Plan(self.world, train.micro_batch_size, train.gradient_accumulation, train.group_window, train.seed)
        self.shards = {split: ray.train.get_dataset_shard(split) for split in ("train", "val")}
        self.precision = worker_precision(loop["precision"], train)
        ds_config = deepspeed_config(train, self.world, self.precision)
        if train.zero_stage == 3:
            _release_freed_blocks()
        model, keep_alive = build_model(loop["model_path"], train, self.precision, ds_config)
        self.memory = {"after_load": _memory_now_mb()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=train.learning_rate, weight_decay=train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(loop["total_steps"], train.warmup_ratio))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=self.scheduler,
                                                    config=ds_config)
        del keep_alive
        self.memory["after_initialize"] = _memory_now_mb()
        self.device = self.engine.device
        # Position and history; a checkpoint overrides them.
        self.state = {"global_step": 0, "epoch": 0, "steps_done_in_epoch": 0, "train_loss": [], "val_loss": [],
                      "starts": [], "tokens": 0, "train_seconds": 0.0, "log_seconds": 0.0, "final": False}
        self.say(f"{self.world} workers, ZeRO-{train.zero_stage}, {self.precision}, {torch.get_num_threads()} torch "
                 f"threads per worker (CPUs {sorted(os.sched_getaffinity(0))}); {loop['examples']['train']} train / "
                 f"{loop['examples']['val']} val examples streamed in windows of {self.plan.window_rows} rows, "
                 f"{loop['total_steps']} steps")

    def say(self, text: str) -> None:
        # the root logger reaches the driver once (Ray Train tees print() into it, so printing would show twice)
        if self.rank == 0:
            logging.getLogger().info(f"[safeconf train] {text}")

    def all_sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces only GPU tensors
        dist.all_reduce(tensor)
        return tensor.tolist()

    def per_rank(self, mine: list[float]) -> list[list[float]]:
        """Every rank's `mine` (the same length on every rank), in rank order, through one all_sum."""
        values = [0.0] * (len(mine) * self.world)
        values[self.rank * len(mine):(self.rank + 1) * len(mine)] = mine
        values = self.all_sum(values)
        return [values[r * len(mine):(r + 1) * len(mine)] for r in range(self.world)]

    def batch(self, examples, positions) -> dict:
        return {k: v.to(self.device) if hasattr(v, "to") else v
                for k, v in collate(examples, positions, self.loop["pad_token_id"]).items()}

    def restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                with open(os.path.join(folder, STATE_FILE)) as f:
                    self.state.update(json.load(f))
                # frozen base weights are not in the checkpoint: they come from the base model, as they did at start
                load_path, _ = self.engine.load_checkpoint(folder, tag=self.state["tag"], load_module_strict=False)
                if load_path is None:
                    raise RuntimeError(f"could not load the DeepSpeed checkpoint {self.state['tag']} from {folder}")
        self.state["starts"].append(self.state["global_step"])
        if self.state["global_step"]:
            self.say(f"resumed from step {self.state['global_step']} (epoch {self.state['epoch']}, "
                     f"{self.state['steps_done_in_epoch']} steps into it)")

    def evaluate(self) -> float | None:
        """Token-weighted validation loss over the whole val set, streamed in windows. Every rank runs the same
        number of forward passes (ZeRO-3 gathers parameters in each), padding with a weightless batch."""
        import torch

        loss_sum, token_sum, seen = 0.0, 0.0, 0
        self.engine.eval()
        with torch.no_grad():
            for _, window in stream_windows(self.shards["val"], self.plan.window_rows):
                seen += len(window)
                mine = np.arange(self.rank, len(window), self.world)
                mine = mine[np.argsort(window.lengths[mine], kind="stable")]
                batches = math.ceil(math.ceil(len(window) / self.world) / self.train.micro_batch_size)
                for positions in np.array_split(mine, batches):
                    weight = 1.0 if len(positions) else 0.0
                    loss, tokens = causal_lm_loss(self.engine, self.batch(window, positions if len(positions) else [0]))
                    loss_sum += weight * loss.item() * tokens
                    token_sum += weight * tokens
        self.engine.train()
        if not seen:
            return None
        loss_sum, token_sum = self.all_sum([loss_sum, token_sum])
        return loss_sum / max(token_sum, 1.0)

    def save_checkpoint(self, metrics: dict, final: bool) -> None:
        import ray.train
        from ray.train import Checkpoint

        folder = tempfile.mkdtemp(prefix="safeconf-ckpt-")
        tag = f"step{self.state['global_step']:06d}"
        # every rank writes its ZeRO shard; Ray merges the rank folders into one checkpoint in storage
        self.engine.save_checkpoint(folder, tag=tag, exclude_frozen_parameters=True)
        snapshot = self.state["global_step"] in self.snapshot_steps
        if final or snapshot:
            export_adapter(self.engine, os.path.join(folder, ADAPTER_DIR), self.rank)
        if snapshot and self.rank == 0:  # a learning curve's model: kept beside the run, not rotated out with it
            io.publish_dir(os.path.join(folder, ADAPTER_DIR),
                           io.join(self.loop["snapshot_uri"], f"step-{self.state['global_step']}"))
        if self.rank == 0:
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({**self.state, "tag": tag, "final": final}, f)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))
        shutil.rmtree(folder, ignore_errors=True)

    def steps(self):
        """(epoch, step in epoch, steps in epoch, micro-batches) of every optimizer step still to take, resuming
        after the last one a checkpoint recorded."""
        steps_per_epoch, state = self.loop["steps_per_epoch"], self.state
        epoch = state["epoch"] if state["steps_done_in_epoch"] < steps_per_epoch else state["epoch"] + 1
        skip = state["steps_done_in_epoch"] if epoch == state["epoch"] else 0
        for epoch in range(epoch, self.train.epochs):
            skip_windows, skip_in_window = divmod(skip, self.plan.group_window)
            step_in_epoch = skip
            for w, window in stream_windows(self.shards["train"], self.plan.window_rows, skip_windows):
                plan = self.plan.window_steps(window.lengths, self.rank, epoch, w, self.train.group_by_length)
                for micro_batches in plan[skip_in_window if w == skip_windows else 0:]:
                    yield epoch, step_in_epoch, steps_per_epoch, [self.batch(window, p) for p in micro_batches]
                    step_in_epoch += 1
            skip = 0

    def run(self) -> dict | None:
        import torch.distributed as dist

        self.restore()
        train, state = self.train, self.state
        start_step, total_steps = state["global_step"], self.loop["total_steps"]
        step_records = []  # (this rank's tokens, seconds) of every step of this attempt, for a robust median
        window = {"loss": 0.0, "micro": 0, "tokens": 0, "seconds": 0.0}
        done = state["final"] or state["global_step"] >= total_steps
        self.engine.train()
        steps = self.steps() if not done else iter(())
        while not done:
            started = time.perf_counter()
            item = next(steps, None)  # reading the stream counts as step time: it is part of training's cost
            if item is None:
                break
            epoch, step_in_epoch, steps_per_epoch, micro_batches = item
            step_tokens = 0
            for batch in micro_batches:
                loss, _ = causal_lm_loss(self.engine, batch)
                self.engine.backward(loss)
                self.engine.step()  # DeepSpeed steps the optimizer and the LR schedule at the accumulation boundary
                window["loss"] += loss.item()
                window["micro"] += 1
                step_tokens += int(batch["attention_mask"].sum())
            state["global_step"] += 1
            state.update(epoch=epoch, steps_done_in_epoch=step_in_epoch + 1)
            _fault_injection(self.loop, state["global_step"], self.rank, self.world)
            seconds = time.perf_counter() - started
            window["seconds"] += seconds
            window["tokens"] += step_tokens
            step_records.append((step_tokens, seconds))

            step = state["global_step"]
            epoch_end = step_in_epoch == steps_per_epoch - 1
            done = step >= total_steps or (epoch_end and epoch == train.epochs - 1)
            do_checkpoint = done or epoch_end or step % train.checkpoint_every == 0 or step in self.snapshot_steps
            if not (do_checkpoint or step % train.log_every == 0):
                continue
            # every rank reaches this point at the same steps, so every rank reports the same number of times
            self.report(window, epoch, step_in_epoch, steps_per_epoch, epoch_end, do_checkpoint, done)
            window = {"loss": 0.0, "micro": 0, "tokens": 0, "seconds": 0.0}

        step_tokens = self.all_sum([float(t) for t, _ in step_records]) if step_records else []
        step_rates = [t / s for t, (_, s) in zip(step_tokens, step_records)]  # all ranks, over rank 0's step time
        result = {**state, "start_step": start_step, "world_size": self.world,
                  "median_step_tokens_per_s": float(np.median(step_rates)) if step_rates else None,
                  "memory_mb_per_worker": self.gather_memory(), "worker_nodes": self.worker_nodes(),
                  "precision": self.precision}
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()  # ZeRO-3 can abort at interpreter exit otherwise
        return result if self.rank == 0 else None

    def worker_nodes(self) -> list[str]:
        """The Ray node id of every rank, in rank order: where Ray placed the workers."""
        import ray
        import torch.distributed as dist

        nodes = [None] * self.world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        return nodes

    def gather_memory(self) -> list[dict]:
        """Every rank's memory snapshots ({phase: {rss, anon, file, peak so far}}), for the summary."""
        phases = [p for p in ("after_load", "after_initialize", "last_report") if p in self.memory]
        fields = ("rss", "anon", "file", "peak")
        ranks = self.per_rank([float(self.memory[p][f]) for p in phases for f in fields])
        return [{p: {f: round(next(values)) for f in fields} for p in phases} for values in map(iter, ranks)]

    def report(self, window: dict, epoch: int, step_in_epoch: int, steps_per_epoch: int, epoch_end: bool,
               do_checkpoint: bool, done: bool) -> None:
        import ray.train

        state = self.state
        log_started = time.perf_counter()
        loss_sum, micro, tokens, seconds = self.all_sum([window["loss"], window["micro"], window["tokens"],
                                                         window["seconds"]])
        seconds /= self.world
        state["tokens"] += int(tokens)
        state["train_seconds"] += seconds
        metrics = {"step": state["global_step"], "epoch": epoch + (step_in_epoch + 1) / steps_per_epoch,
                   "loss": loss_sum / micro, "learning_rate": self.scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens / max(seconds, 1e-9), "total_steps": self.loop["total_steps"]}
        state["train_loss"].append([state["global_step"], metrics["loss"]])
        if epoch_end:
            metrics["val_loss"] = self.evaluate()
            state["val_loss"].append([epoch + 1, metrics["val_loss"]])
        self.memory["last_report"] = _memory_now_mb()
        peaks = self.per_rank([float(self.memory["last_report"]["peak"])])
        metrics["peak_rss_mb"] = state["peak_rss_mb"] = [peak for (peak,) in peaks]
        self.say(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                          if k != "peak_rss_mb"))
        if do_checkpoint:
            self.save_checkpoint(metrics, final=done)
        else:
            ray.train.report(metrics)
            state["log_seconds"] += time.perf_counter() - log_started


def train_loop(loop: dict) -> dict | None:
    """Ray Train worker function (every rank runs it)."""
    return Worker(loop).run()
