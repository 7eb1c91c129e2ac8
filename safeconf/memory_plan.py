"""GPU memory a run config needs, per stage and per GPU, estimated before launch (used by safeconf.cluster_check).

The estimates are arithmetic on the model's shape, not measurements; each term is named so a misfit says which
setting to change:

  engines (vLLM)  weights / tensor_parallel_size, plus a KV cache that must hold at least one max_model_len
                  sequence inside engine.gpu_memory_utilization of the GPU (vLLM refuses to start otherwise)
  train workers   base weights (whole, or a ZeRO-3 shard plus the gathered parameters), the LoRA matrices with
                  their fp32 master copy, gradients and Adam state, the activations of one micro-batch (every
                  layer's, or with gradient checkpointing every layer's input plus one layer's), and the logits of
                  the reply positions
  every stage     CUDA context and allocator slack (CUDA_OVERHEAD_GIB)

Activation coefficients: a LLaMA/Qwen2 decoder layer keeps ~16 hidden-sized and ~5 intermediate-sized tensors
per token for its backward pass when LoRA sits on all seven projections (norms, q/k/v/o, each LoRA input's dropout
copy, gate/up/act/product), with attention through SDPA (no seq x seq scores kept).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safeconf.config import Config

GIB = 1024**3
CUDA_OVERHEAD_GIB = 1.5  # CUDA context, NCCL buffers and the caching allocator's fragmentation
HIDDEN_TENSORS_PER_LAYER = 16
INTERMEDIATE_TENSORS_PER_LAYER = 5
LOGITS_BYTES = 2 + 4 + 4  # the bf16 logits, their fp32 upcast in the loss, and its gradient
# The LM head runs on the target positions only (train.data.causal_lm_loss: logits_to_keep = the longest reply + 1);
# a SafeConf reply ("Answer: B\nConfidence: 80%") is ~10-20 tokens: 64 bounds it with room.
LOGIT_POSITIONS = 64
LORA_STATE_BYTES = 4 + 4 + 8  # fp32 master weight, gradient, Adam's two moments
VLLM_ACTIVATION_GIB = 2.0  # vLLM's profiled forward peak for a 7-8B model at its default batched-token budget


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each of a decoder layer's seven linear projections."""
        kv = self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def params(self) -> float:
        layer = sum(a * b for a, b in self.projection_shapes().values()) + 2 * self.hidden
        return self.layers * layer + self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def lora_params(self, rank: int, targets: list[str]) -> float:
        shapes = self.projection_shapes()
        wanted = {t: shapes[t] for t in targets if t in shapes}
        return self.layers * sum(rank * (a + b) for a, b in wanted.values())

    def kv_bytes_per_token(self, dtype_bytes: int) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# The published config.json of the models the shipped GPU configs name, for a plan without a download.
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-7B-Instruct": ModelShape(28, 3584, 18944, 28, 4, 152064),
    "meta-llama/Meta-Llama-3-8B-Instruct": ModelShape(32, 4096, 14336, 32, 8, 128256),
}

# GPU memory by accelerator as the driver reports it (24 GB cards show ~22.5 GiB), and the accelerator of the
# instance types the cluster files use.
GPU_MEMORY_GIB = {"T4": 15.0, "A10G": 22.5, "L4": 22.5, "L40S": 45.0, "V100": 15.8, "A100-40G": 39.6,
                  "A100-80G": 79.3, "H100": 79.6, "H200": 140.4}
INSTANCE_ACCELERATORS = {  # prefix of an EC2 instance type / GCE machine type -> accelerator
    "g4dn.": "T4", "g5.": "A10G", "g6.": "L4", "g6e.": "L40S", "p3.": "V100", "p4d.": "A100-40G",
    "p4de.": "A100-80G", "p5.": "H100", "p5e.": "H200", "p5en.": "H200",
    "g2-": "L4", "a2-highgpu-": "A100-40G", "a2-megagpu-": "A100-40G", "a2-ultragpu-": "A100-80G",
    "a3-": "H100",
}
GKE_ACCELERATORS = {"nvidia-tesla-t4": "T4", "nvidia-l4": "L4", "nvidia-tesla-v100": "V100",
                    "nvidia-tesla-a100": "A100-40G", "nvidia-a100-80gb": "A100-80G", "nvidia-h100-80gb": "H100",
                    "nvidia-h100-mega-80gb": "H100", "nvidia-h200-141gb": "H200"}


def accelerator_of(instance_type: str = "", gke_accelerator: str = "", ray_resources: dict | None = None) -> str:
    """The accelerator of a node type: Ray's `accelerator_type:NAME` resource first, then a GKE accelerator label,
    then the instance type's family; '' where none says."""
    for key in ray_resources or {}:
        if key.startswith("accelerator_type:"):
            return key.split(":", 1)[1]
    if gke_accelerator in GKE_ACCELERATORS:
        return GKE_ACCELERATORS[gke_accelerator]
    for prefix, name in sorted(INSTANCE_ACCELERATORS.items(), key=lambda item: -len(item[0])):
        if instance_type.startswith(prefix):
            return name
    return ""


def model_shape(name: str) -> ModelShape | None:
    """The shape of config.model.name: a local folder's config.json, else the published shapes above; None where
    neither knows it (the plan is then skipped, never guessed)."""
    path = Path(name) / "config.json"
    if path.is_file():
        c = json.loads(path.read_text(encoding="utf-8"))
        c = c.get("text_config", c)
        return ModelShape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
                          c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]),
                          c["vocab_size"], bool(c.get("tie_word_embeddings", False)))
    return KNOWN_SHAPES.get(name)


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype in ("float32", "fp32") else 2  # auto / bf16 / fp16 on a GPU


@dataclass
class StagePlan:
    stage: str
    terms: dict[str, float]  # bytes per GPU, by what they hold
    limit: float  # bytes of the GPU the stage may use
    fix: str  # the settings that bring it down

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.limit

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.terms.items())
        return f"{self.total / GIB:.1f} GiB ({parts}) of {self.limit / GIB:.1f} GiB usable"


def engine_plan(config: Config, shape: ModelShape, gpu_gib: float) -> StagePlan:
    """One vLLM engine's share of each GPU it holds. vLLM takes gpu_memory_utilization of the GPU for weights,
    its activation peak and the KV cache; the rest of that share must cache one whole max_model_len sequence."""
    engine = config.engine
    tp = max(1, engine.tensor_parallel_size)
    dtype = _dtype_bytes(config.model.dtype)
    terms = {"weights": shape.params * dtype / tp,
             "activations": VLLM_ACTIVATION_GIB * GIB,
             "KV cache for one max_model_len sequence": engine.max_model_len * shape.kv_bytes_per_token(dtype) / tp}
    return StagePlan("engine actors", terms, engine.gpu_memory_utilization * gpu_gib * GIB,
                     "engine.tensor_parallel_size (split the weights over more GPUs), engine.max_model_len, "
                     "engine.gpu_memory_utilization, or a larger GPU")


def activation_bytes(shape: ModelShape, tokens: int, dtype: int, checkpointing: bool) -> float:
    per_layer = tokens * dtype * (HIDDEN_TENSORS_PER_LAYER * shape.hidden
                                  + INTERMEDIATE_TENSORS_PER_LAYER * shape.intermediate)
    if checkpointing:  # each layer's input is kept; one layer's activations are rebuilt at a time
        return shape.layers * tokens * dtype * shape.hidden + per_layer
    return shape.layers * per_layer


def train_plan(config: Config, shape: ModelShape, gpu_gib: float) -> StagePlan:
    """One Ray Train worker's GPU (DeepSpeed ZeRO + LoRA)."""
    train = config.train
    dtype = 4 if train.precision == "fp32" else 2
    weights = shape.params * dtype
    if train.zero_stage == 3:
        shard = 0.0 if train.offload_params else weights / max(1, train.num_workers)
        gathered = min(train.zero3_max_live_parameters, shape.params) * dtype
        weight_terms = {"weights (ZeRO-3 shard)": shard, "gathered parameters (zero3_max_live_parameters)": gathered}
    else:
        weight_terms = {"weights": weights}
    lora = shape.lora_params(train.lora_rank, list(train.lora_target_modules))
    lora_bytes = lora * (dtype + (4 if train.offload_optimizer else LORA_STATE_BYTES))
    tokens = train.micro_batch_size * train.max_length
    terms = {**weight_terms, "LoRA + optimizer state": lora_bytes,
             "activations" + (" (checkpointed)" if train.gradient_checkpointing else ""):
                 activation_bytes(shape, tokens, dtype, train.gradient_checkpointing),
             "logits": train.micro_batch_size * min(LOGIT_POSITIONS, train.max_length) * shape.vocab * LOGITS_BYTES,
             "CUDA context": CUDA_OVERHEAD_GIB * GIB}
    fix = ("train.micro_batch_size or train.max_length (raise train.gradient_accumulation to keep the batch)"
           if train.gradient_checkpointing else
           "train.gradient_checkpointing: true, or a smaller train.micro_batch_size / train.max_length")
    if train.zero_stage != 3:
        fix += "; train.zero_stage: 3 shards the weights over the workers"
    return StagePlan("train workers", terms, gpu_gib * GIB, fix)


def stage_plan(config: Config, stage: str, gpu_gib: float) -> StagePlan | str:
    """The GPU memory plan of one stage's request ("engine actors", "serve replicas" or "train workers", as
    safeconf.cluster_check names them) on a GPU of gpu_gib; a string saying why there is none."""
    shape = model_shape(config.model.name)
    if shape is None:
        return (f"no memory plan: the shape of model.name={config.model.name} is unknown here (a local folder with "
                f"config.json, or one of {', '.join(KNOWN_SHAPES)})")
    if stage == "train workers":
        return train_plan(config, shape, gpu_gib)
    plan = engine_plan(config, shape, gpu_gib)
    plan.stage = stage
    if stage == "serve replicas" and config.serve.adapters:
        add_adapters(plan, config, shape, gpu_gib)
    return plan


def add_adapters(plan: StagePlan, config: Config, shape: ModelShape, gpu_gib: float) -> None:
    """The serve.adapters a replica keeps loaded (serve.max_models_per_replica) in its plan. On the async vLLM engine
    each is a LoRA slot over the one base model (vLLM sizes every slot for every linear projection at the largest
    rank, the main adapter's slot besides); elsewhere each is a merged copy of the model, a whole engine more (a
    vLLM engine claims gpu_memory_utilization of the GPU however small its model)."""
    from safeconf.config import ALL_LINEAR
    from safeconf.engines import resolve_engine_kind

    slots = config.serve.max_models_per_replica
    dtype = _dtype_bytes(config.model.dtype)
    tp = max(1, config.engine.tensor_parallel_size)
    if config.serve.replica_engine != "batched" and resolve_engine_kind(config.engine.kind) == "vllm":
        slots += bool(config.model.adapter)
        plan.terms[f"LoRA slots ({slots} x rank {config.train.lora_rank})"] = (
            slots * shape.lora_params(config.train.lora_rank, ALL_LINEAR) * dtype / tp)
    elif resolve_engine_kind(config.engine.kind) == "vllm":
        plan.terms[f"merged adapter copies ({slots} vLLM engines)"] = (
            slots * config.engine.gpu_memory_utilization * gpu_gib * GIB)
    else:
        plan.terms[f"merged adapter copies ({slots})"] = slots * shape.params * dtype / tp
    if not any(name.startswith("LoRA slots") for name in plan.terms):
        plan.fix = "serve.replica_engine=auto with engine.kind=vllm (adapters as LoRA slots), " + plan.fix
