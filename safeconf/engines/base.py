"""The engine interface, and the choice of engine from the config (a setting, never a fork in the pipeline)."""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

from safeconf.config import EngineConfig, ModelConfig


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    token_logprobs: list[float] | None  # log-prob of each chosen token under the model; None if not given


class Engine(ABC):
    """Generate `n` samples for each chat prompt, in one call for the whole batch."""

    tokenizer = None  # a transformers tokenizer; renders chat templates and maps text offsets to tokens

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        prompts: list[list[dict]],
        n: int = 1,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_tokens: int = 32,
        stop: list[str] | None = None,
    ) -> list[list[Completion]]:
        """One list of `n` completions per prompt, in prompt order; text ends before any `stop` string."""
        if not prompts:
            return []
        if temperature <= 0 and n > 1:  # greedy decoding has one answer; both engines refuse n > 1 for it
            return [samples * n for samples in self._generate(prompts, 1, 0.0, top_p, max_tokens, stop)]
        return self._generate(prompts, n, temperature, top_p, max_tokens, stop)

    @abstractmethod
    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop) -> list[list[Completion]]:
        """The engine's own batched call (non-empty prompts; n == 1 when greedy)."""

    def option_logprobs(
        self, prompts: list[list[dict]], answer_prefixes: list[str], labels: list[list[str]]
    ) -> list[list[float]]:
        """Log-probability of each option label as the next token after the reply opens with the prefix.

        `answer_prefixes` should not end in whitespace ("Answer:", "答案："): the label's token then carries
        its own leading space, as the model would write it.
        """
        contexts, targets = [], []
        for messages, prefix, options in zip(prompts, answer_prefixes, labels):
            context = self.render(messages) + prefix
            base = self.tokenizer.encode(context, add_special_tokens=False)
            contexts.append(base)
            targets.append([self._label_token(base, context, label) for label in options])
        return self._next_token_logprobs(contexts, targets)

    def _label_token(self, base: list[int], context: str, label: str) -> int:
        """The first token the label adds after the context (tokenized together, as the model sees it)."""
        # "Answer: B" but "答案：B": a space only after an ASCII prefix, as the reply format writes it.
        separator = " " if context[-1:].isascii() else ""
        full = self.tokenizer.encode(context + separator + label, add_special_tokens=False)
        k = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
        if k < len(base):
            raise ValueError(f"label {label!r} merges with the answer prefix; end the prefix with punctuation")
        return full[k]

    @abstractmethod
    def _next_token_logprobs(self, contexts: list[list[int]], targets: list[list[int]]) -> list[list[float]]:
        """For each context (token ids), the log-probabilities of the candidate next tokens."""

    def token_logprob_at(self, completion: Completion, char_offset: int) -> float | None:
        """Log-prob of the generated token that produces the character at `char_offset` of the text."""
        if completion.token_logprobs is None or char_offset is None:
            return None
        for i in range(len(completion.token_ids)):
            decoded = self.tokenizer.decode(completion.token_ids[: i + 1], skip_special_tokens=True)
            if len(decoded) > char_offset:
                return completion.token_logprobs[i]
        return None


def cpu_threads(config: EngineConfig) -> int:
    """Threads for a CPU engine: engine.cpu_threads, else OMP_NUM_THREADS (which the pipeline sets for its
    engine actors when they start, see pipeline.map_on_engines), else every core this process may use."""
    return config.cpu_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


def engine_runtime_env(engine: EngineConfig) -> dict:
    """runtime_env of an engine actor (pipeline actor or Serve replica). Ray starts actors with OMP_NUM_THREADS =
    num_cpus (1), which would leave a small node's other cores idle while the engine is the only heavy work; the
    count must be in place before the process starts, as vLLM's CPU kernels check it against what OpenMP began
    with."""
    threads = engine.cpu_threads or len(os.sched_getaffinity(0))
    return {"env_vars": {"OMP_NUM_THREADS": str(threads)}}


def resolve_engine_kind(kind: str) -> str:
    """'auto' picks vLLM where it is installed, else transformers."""
    if kind == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return kind


def placement_bundles(engine: EngineConfig) -> list[dict] | None:
    """Placement-group bundles of one tensor-parallel vLLM engine; None without tensor parallelism.

    vLLM's Ray executor starts one worker per GPU itself, inside the placement group of the actor that holds the
    engine, so that actor reserves no GPU: it takes the first bundle (its CPUs and memory) and the workers take
    one GPU bundle each. Reserving the GPUs on the actor as well would ask for them twice.
    """
    if engine.tensor_parallel_size <= 1:
        return None
    coordinator = {"CPU": engine.num_cpus} | ({"memory": int(engine.memory_gib * 1024**3)} if engine.memory_gib else {})
    return [coordinator] + [{"GPU": 1}] * engine.tensor_parallel_size


def make_engine(model: ModelConfig, engine: EngineConfig, seed: int = 0) -> Engine:
    from safeconf.models import fetch, resolve_model

    path = resolve_model(model.name, model.cache_dir)
    adapter = fetch(model.adapter, model.cache_dir) if model.adapter else ""  # on this node, where it is loaded
    kind = resolve_engine_kind(engine.kind)
    if kind == "vllm":
        from safeconf.engines.vllm_engine import VLLMEngine

        return VLLMEngine(path, model.dtype, engine, seed=seed, adapter=adapter)
    from safeconf.engines.hf_engine import HFEngine

    return HFEngine(path, model.dtype, engine, seed=seed, adapter=adapter)
