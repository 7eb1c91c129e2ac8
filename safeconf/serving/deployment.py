"""The engine replica (JudgeServer: one engine, one model copy; it judges, answers chat requests and escalates the
judgements it defers), behind the HTTP front (safeconf.serving.app.JudgeFront, the ingress, which calls it through
a DeploymentHandle). The application of the two is built in safeconf.serving.application.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ray import serve

from safeconf.config import Config, config_from_dict
from safeconf.engines.vllm_async import CallScope
from safeconf.serving.app import MAIN
from safeconf.serving.metrics import judgement_counter
from safeconf.serving.escalation import EscalationError, EscalationTarget, escalate, with_escalation
from safeconf.serving.judging import (
    POLICY_KEYS,
    JudgeItem,
    JudgePolicy,
    adapter_config,
    check_servable,
    judge_batch,
    with_decision,
)
from safeconf.serving.schemas import ApiError

log = logging.getLogger("ray.serve")  # the replica's log file, beside Serve's own lines

# @serve.multiplexed takes its bound when the class is defined: a replica imports this module with the variable
# already in its environment (deployment_options sets it from serve.max_models_per_replica).
MODELS_PER_REPLICA_ENV = "SAFECONF_MAX_MODELS_PER_REPLICA"
FRONT_NUM_CPUS = 0.1  # the front forwards (one coroutine per request) and holds no model
# A request that reached its replica with less than request_timeout_s - this left had waited for one (beyond the
# milliseconds of routing): running out of time is then a capacity shortfall (503), not a slow model (504).
QUEUE_TOLERANCE_S = 0.5


class JudgeServer:
    """One engine replica: one engine (one model copy), its judging and escalation. No HTTP: the front
    (safeconf.serving.app.JudgeFront) validates each request and calls `judge` or `chat` through a handle.

    Two ways to drive the engine (serve.replica_engine):
    - async (vLLM): the engine is vLLM's async engine, and each request runs the judging code (synchronous, the
      evaluation's own) on a thread of its own; its prompts join the batch the engine is running.
    - batched (the hf engine): one thread owns the engine (an hf model is not thread-safe); @serve.batch groups the
      requests of a route, and what queued behind a busy engine is merged into its next call (_on_engine).

    A plain module-level class (decorated below, not with @), so Ray pickles it by reference and the
    replica runs this module's code as imported there.
    """

    def __init__(self, config: dict):
        self.config = config_from_dict(config)
        self.model_id = self.config.serve.model_id or self.config.model.name
        self.judgements = judgement_counter()
        self.engine_batches = 0  # judge_batch / chat_batch calls: merged batches (batched), one a request (async)
        self.waiting, self.runner = [], None  # batches waiting for the engine, and the task that feeds it
        self.policy: JudgePolicy | None = None  # set by reconfigure from build_app's user_config, before traffic
        self.timeout_s = self.config.serve.request_timeout_s
        self.escalation: EscalationTarget | None = None  # set by reconfigure (user_config "escalation")
        self.session = None  # the aiohttp session of escalations, made on the replica's event loop at first use
        self.adapters = {entry["name"]: entry for entry in self.config.serve.adapters}  # serve.adapters by name
        self.adapter_policies: dict[str, JudgePolicy] = {}  # set by reconfigure (user_config "adapters")
        self.engine_loads: list[str] = []  # adapters loaded by this replica, in order (multiplexing)
        self.asynchronous = replica_is_async(self.config)
        if self.asynchronous:
            # a thread per request in flight: each waits on its own engine requests while the engine batches them all
            self.executor = ThreadPoolExecutor(max_workers=self.config.serve.max_ongoing_requests,
                                               thread_name_prefix="judging")
            self.engine = self._make_engine()
        else:
            # One thread owns the engine: its calls never overlap (engines are not thread-safe), and the
            # event loop stays free while the model works (the engine is built there too, so a CPU engine's
            # thread settings apply to the thread that runs it).
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
            self.engine = self.executor.submit(self._make_engine).result()
        for batched in (self._judge_batch, self._chat_batch):
            batched.set_max_batch_size(self.config.serve.max_batch_size)
            batched.set_batch_wait_timeout_s(self.config.serve.batch_wait_timeout_s)
        log.info("SafeConf replica ready: model %s, adapter %r, engine %s", self.model_id,
                 self.config.model.adapter, type(self.engine).__name__)

    def _make_engine(self, model=None):
        from safeconf.engines import make_engine

        serve_config = self.config.serve
        return make_engine(model or self.config.model, self.config.engine, seed=self.config.sampling.seed,
                           asynchronous=self.asynchronous,
                           lora_slots=serve_config.max_models_per_replica if serve_config.adapters else 0,
                           lora_rank=self.config.train.lora_rank)  # the rank SafeConf's adapters are trained at

    @serve.multiplexed(max_num_models_per_replica=int(os.environ.get(MODELS_PER_REPLICA_ENV, "2")))
    async def adapter_engine(self, name: str):
        """The engine of an adapter of serve.adapters, loaded on the engine thread on first use; Serve keeps the
        most recently used serve.max_models_per_replica of them and drops the others (the front sends each
        request with its model as the multiplexed model id, so Serve routes it to a replica that has it)."""
        model = adapter_config(self.config, self.adapters[name]).model
        self.engine_loads.append(name)
        log.info("loading adapter %s (%s)", name, model.adapter)
        if getattr(self.engine, "multi_lora", False):  # a LoRA slot of the engine that is running (vLLM on a GPU)
            from safeconf.models import fetch

            return self.engine.with_adapter(name, fetch(model.adapter, model.cache_dir))
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._make_engine, model)

    def policy_of(self, name: str) -> JudgePolicy:
        if name == MAIN:
            return self.policy
        if name not in self.adapter_policies:
            raise ApiError(404, f"model {name!r} is not served here; served: "
                           f"{[self.model_id, *self.adapter_policies]}", "model", "model_not_found")
        return self.adapter_policies[name]

    async def engine_of(self, name: str):
        return self.engine if name == MAIN else await self.adapter_engine(name)

    def reconfigure(self, user_config: dict):
        """Serve's user_config: the judging policy (method, threshold, judging settings) and the timeout change
        without reloading the model; a partial update keeps the rest of the policy."""
        if POLICY_KEYS & user_config.keys():
            policy = JudgePolicy.from_user_config(user_config, self.policy)
            check_servable(policy.method, bool(self.config.model.adapter))
            self.policy = policy
            log.info("judging with %s", policy)
        if "request_timeout_s" in user_config:
            self.timeout_s = float(user_config["request_timeout_s"])
        if "adapters" in user_config:
            policies = {name: JudgePolicy.from_user_config(values) for name, values in user_config["adapters"].items()}
            for name, policy in policies.items():
                if name not in self.adapters:
                    raise ValueError(f"user_config adapters: {name!r} is not in serve.adapters")
                check_servable(policy.method, True)
            self.adapter_policies = policies
        if "escalation" in user_config:
            self.escalation = EscalationTarget.from_dict(user_config["escalation"])
            if self.escalation and self.escalation.key_env and not self.escalation.api_key():
                log.warning("escalating to %s without a key: $%s is not set in the replica", self.escalation.url,
                            self.escalation.key_env)

    def replica_info(self) -> dict:
        """For operators and tests, through the engine's deployment handle (serve.get_deployment_handle(
        "SafeConfJudge", app_name)), not HTTP. actor_name (namespace "serve") finds the replica's actor."""
        import ray

        policy = self.policy
        return {"pid": os.getpid(), "actor_name": ray.get_runtime_context().get_actor_name(),
                "engine_batches": self.engine_batches, "replica_engine": "async" if self.asynchronous else "batched",
                "peak_in_flight": getattr(self.engine, "peak_in_flight", None), "method": policy.method,
                "threshold": policy.threshold, "threshold_source": policy.source,
                "judging": policy.settings.to_dict(), "guarantee": policy.guarantee, "timeout_s": self.timeout_s,
                "escalation": self.escalation.to_dict() if self.escalation else None,
                "adapters": {name: p.user_config() for name, p in self.adapter_policies.items()},
                "engine_loads": list(self.engine_loads)}

    # the calls of the front: judge(name, items) and chat(name, request), each answering an envelope

    async def judge(self, name: str, items: list[JudgeItem], deadline: float) -> dict:
        """The judgements of the items by served model `name`, decided and escalated (see _verdicts)."""
        return await self._answered(lambda ends: self._verdicts(name, items, ends), deadline)

    async def chat(self, name: str, request: dict, deadline: float) -> dict:
        """A chat completion's choices and usage (the front adds id, model, created)."""
        return await self._answered(lambda ends: self._chat(name, request), deadline)

    async def _answered(self, work, deadline: float) -> dict:
        """Run work(monotonic deadline) within the time left of the request (the front's wall-clock `deadline`,
        and this replica's request_timeout_s); {"result": ...} or {"error": {status, type, message, param}}, so
        that no exception (nor its trace) crosses to the front.

        Out of time: 504 when this replica had the request's whole serve.request_timeout_s (the model is too slow
        for it); 503 (the front adds Retry-After) when part of that time went waiting for a replica, one restarting
        or busy: the shortfall is capacity, and a retry later is the cure."""
        left = deadline - time.time()
        budget = min(self.timeout_s, left)
        waited = left < self.timeout_s - QUEUE_TOLERANCE_S
        if budget <= 0:
            return _error(503, "service_unavailable", "the request waited past serve.request_timeout_s for a "
                          "free replica; retry later")
        try:
            return {"result": await asyncio.wait_for(work(time.monotonic() + budget), budget)}
        except ApiError as e:
            return _error(e.status, e.kind, e.message, e.param)
        except asyncio.TimeoutError:
            if waited:
                return _error(503, "service_unavailable", f"no answer in the {budget:.1f} s left after waiting for a "
                              "free replica (serve.request_timeout_s); retry later")
            return _error(504, "timeout", f"no answer within {budget:g} s (serve.request_timeout_s)")
        except Exception:
            log.exception("error answering a request")
            return _error(500, "internal_error", "internal error; see the server log")

    # judge

    async def _verdicts(self, name: str, items: list[JudgeItem], deadline: float) -> list[dict]:
        """The judgements of the items by served model `name` (batched with other requests'), their decisions and
        tiers, and the deferred ones escalated where serve.escalate_url is set; `deadline` (time.monotonic())
        bounds escalation."""
        policy = self.policy_of(name)
        if self.asynchronous:
            engine = await self.engine_of(name)
            answers = await self._in_thread(judge_batch, engine, items, policy.method, policy.settings)
        else:
            answers = await asyncio.gather(*[self._judge_batch((name, item)) for item in items])
        answers = [with_decision(answer, policy.threshold) for answer in answers]
        answers = await asyncio.gather(*[self._escalated(answer, item, deadline)
                                         for answer, item in zip(answers, items)])
        for answer in answers:
            self.judgements.inc(tags={"method": answer["method"], "decision": answer["decision"],
                                      "confidence_source": answer["confidence_source"],
                                      "tier": str(answer["tier"]), "decided_by": answer["decided_by"]})
        return [{**answer, "guarantee": policy.guarantee} for answer in answers]

    async def _escalated(self, answer: dict, item: JudgeItem, deadline: float) -> dict:
        """A deferred answer sent to the stronger judge; an accepted one, or any without a target, as it is. A
        failed escalation never fails the request: SafeConf's answer stays (tier uncertain), with the error."""
        target = self.escalation
        if target is None or answer["decision"] == "accept":
            return {**answer, "decided_by": "safeconf", "escalation_error": None}
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession()
        margin = min(0.5, 0.1 * self.timeout_s)  # leave time to answer before the request's own timeout
        try:
            verdict = await escalate(self.session, target, item, deadline - margin)
        except EscalationError as e:
            log.warning("escalation failed: %s", e)
            return with_escalation(answer, error=str(e))
        return with_escalation(answer, verdict)

    async def _in_thread(self, fn, *args):
        """fn(*args) on a judging thread of its own (async replica): the engine shares its batch with the others'.
        A request cancelled meanwhile (out of time, its client gone) aborts its vLLM requests (CallScope)."""
        self.engine_batches += 1
        scope = CallScope()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, scope.run, fn, *args)
        except asyncio.CancelledError:
            scope.cancel()
            raise

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=4)
    async def _judge_batch(self, requests: list[tuple[str, JudgeItem]]) -> list[dict]:
        async def judged(name, items):
            policy = self.policy_of(name)
            return await self._on_engine(judge_batch, await self.engine_of(name), items, policy.method,
                                         policy.settings)

        return await self._per_model(requests, judged)

    @staticmethod
    async def _per_model(requests: list[tuple[str, object]], work) -> list:
        """work(name, items) for the items of each served model in a batch of (model name, item), in the batch's
        order (a batch mixes the models its requests named)."""
        groups: dict[str, list[int]] = {}
        for i, (name, _) in enumerate(requests):
            groups.setdefault(name, []).append(i)
        found = await asyncio.gather(*[work(name, [requests[i][1] for i in members]) for name, members in groups.items()])
        answers = [None] * len(requests)
        for members, answered in zip(groups.values(), found):
            for i, answer in zip(members, answered):
                answers[i] = answer
        return answers

    async def _on_engine(self, fn, engine, requests: list, *args):
        """fn(engine, requests, *args) on the engine thread, merged with the batches that queued meanwhile.

        @serve.batch forms its next batch as soon as the previous one is handed over, not when the engine is free,
        so behind a busy engine it queues many small batches; merging what waits into one call keeps the batches
        full (measured on the embedded model at concurrency 8: mostly 1-3 requests per engine call without it).
        """
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((fn, engine, args, requests, done))
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run_waiting())
        return await done

    async def _run_waiting(self):
        loop, limit = asyncio.get_running_loop(), self.config.serve.max_batch_size
        while self.waiting:
            fn, engine, args = self.waiting[0][:3]
            group, size = [], 0
            for entry in self.waiting:  # same function, engine and settings, up to max_batch_size requests (>= 1)
                if entry[0] is fn and entry[1] is engine and entry[2] == args and (
                        not group or size + len(entry[3]) <= limit):
                    group.append(entry)
                    size += len(entry[3])
            taken = {id(entry) for entry in group}
            self.waiting = [entry for entry in self.waiting if id(entry) not in taken]
            requests = [request for entry in group for request in entry[3]]
            self.engine_batches += 1
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self.executor, fn, engine, requests, *args)
            except Exception as error:  # every request of the call gets the error (each answers 500)
                for *_, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            log.info("%s: %d requests in one engine call (%d batches merged), %.2f s", fn.__name__, len(requests),
                     len(group), time.perf_counter() - started)
            offset = 0
            for *_, batch, future in group:
                if not future.done():  # a request that timed out was cancelled: its answer is dropped
                    future.set_result(answers[offset:offset + len(batch)])
                offset += len(batch)

    # chat

    async def _chat(self, name: str, request: dict) -> dict:
        self.policy_of(name)  # a name not served: 404
        if self.asynchronous:
            (answer,) = await self._in_thread(chat_batch, await self.engine_of(name), [request])
        else:
            answer = await self._chat_batch((name, request))
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": "length" if len(c.token_ids) >= request["max_tokens"] else "stop"}
                   for i, c in enumerate(answer["completions"])]
        completion_tokens = sum(len(c.token_ids) for c in answer["completions"])
        return {"choices": choices, "usage": {"prompt_tokens": answer["prompt_tokens"],
                                              "completion_tokens": completion_tokens,
                                              "total_tokens": answer["prompt_tokens"] + completion_tokens}}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=4)
    async def _chat_batch(self, requests: list[tuple[str, dict]]) -> list[dict]:
        async def completed(name, items):
            return await self._on_engine(chat_batch, await self.engine_of(name), items)

        return await self._per_model(requests, completed)


def chat_batch(engine, requests: list[dict]) -> list[dict]:
    """Completions of a batch of chat requests: one generate call per distinct sampling setting."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        key = json.dumps([r["n"], r["temperature"], r["top_p"], r["max_tokens"], r["stop"]])
        groups.setdefault(key, []).append(i)
    answers: list[dict] = [{} for _ in requests]
    for members in groups.values():
        first = requests[members[0]]
        outputs = engine.generate([requests[i]["messages"] for i in members], n=first["n"],
                                  temperature=first["temperature"], top_p=first["top_p"],
                                  max_tokens=first["max_tokens"], stop=first["stop"] or None)
        for i, completions in zip(members, outputs):
            prompt = engine.render(requests[i]["messages"])
            prompt_tokens = len(engine.tokenizer.encode(prompt, add_special_tokens=False))
            answers[i] = {"completions": completions, "prompt_tokens": prompt_tokens}
    return answers


def replica_is_async(config: Config) -> bool:
    """Whether a replica runs vLLM's async engine (serve.replica_engine; auto: where engine.kind is vLLM)."""
    from safeconf.engines import resolve_engine_kind

    kind = resolve_engine_kind(config.engine.kind)
    if config.serve.replica_engine == "async" and kind != "vllm":
        raise ValueError(f"serve.replica_engine=async needs the vLLM engine; engine.kind={config.engine.kind} "
                         f"resolves to {kind}")
    return config.serve.replica_engine == "async" or (config.serve.replica_engine == "auto" and kind == "vllm")


def _error(status: int, kind: str, message: str, param: str | None = None) -> dict:
    return {"error": {"status": status, "type": kind, "message": message, "param": param}}
