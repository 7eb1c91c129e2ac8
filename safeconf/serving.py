"""The Ray Serve endpoint: calibrated safety judgements over HTTP, and an OpenAI-compatible chat route.

Routes (JSON in, JSON out; errors are `{"error": {"type", "message", "param"}}`, the shape OpenAI clients read):
- `POST /v1/judge`: a multiple-choice question (`question` + `options`), or content to judge: `text` alone
  (is this text safe?), `prompt` alone (is it safe to comply with this request?), or both (is this response to
  the prompt safe?). Answer: the option, the model's confidence in it, and `accept` / `defer` against the
  threshold (serve.threshold, or the one `safeconf evaluate` calibrated, read from its metrics.json).
- `POST /v1/chat/completions`, `GET /v1/models`: the subset of the OpenAI API common clients use.
- `GET /healthz`: liveness, without auth (for load balancers and Kubernetes probes).

Under load: requests of a route are batched (`@serve.batch`, one engine call per batch), replicas autoscale,
each proxy queues at most serve.max_queued_requests (then 503 at once), and a request without an answer after
serve.request_timeout_s gets 504. Engine calls run on one thread per replica, so the replica's event loop keeps
answering health checks, auth refusals and timeouts while the model works.

Bad input never reaches the model: the bearer token (when set) and the body size are checked before the body
is read (401 / 413), the body is validated by pydantic models in strict mode (422 naming the field), and the
configured limits apply (422). Anything unexpected gives a 500 without internals; the replica logs it and
keeps serving. A replica that dies (out of memory, a killed process) is replaced by Serve's controller; the
requests it held get an error response from the proxy (500), not a hang, and new requests go to live replicas.

Run it: `safeconf serve`, `run_serve(config, port)`, `serve run safeconf.serving:app` (config from the YAML
named by $SAFECONF_CONFIG), or `serve run safeconf.serving:app_builder config=FILE key=value ...` (also the
`import_path` + `args` of a KubeRay RayService).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from safeconf.config import Config, config_from_dict, load_config
from safeconf.data.judge import judge_options, judge_question
from safeconf.engines.base import engine_runtime_env, placement_bundles
from safeconf.mutations import detect_lang
from safeconf.prompts import DEFAULT_STYLE, labels_for, parse_answer, render_messages

log = logging.getLogger("ray.serve")  # the replica's log file, beside Serve's own lines

HEALTH_PATH = "/healthz"
ROUTES = ("/v1/judge", "/v1/chat/completions", "/v1/models", HEALTH_PATH)
MAX_CHAT_N = 8  # samples per chat request: n x max_tokens bounds the work one request can ask for
_EPS = 1e-9  # as in evaluation.selective: a confidence of 0.7 computed as 0.6999999999 clears 0.70


# --- request and response bodies ---


class JudgeRequest(BaseModel):
    """One judgement. Strict: a number is not a string, and unknown fields are refused (typos surface)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    question: str | None = Field(None, description="A multiple-choice question (with options).")
    options: list[str] | None = Field(None, min_length=2, description="The options of the question, 2 or more.")
    text: str | None = Field(None, description="Content to judge: a text, or a response to `prompt`.")
    prompt: str | None = Field(None, description="A request: alone, is it safe to comply with; with text, what text answers.")
    lang: Literal["en", "zh"] | None = Field(None, description="Language of the prompt to the model; detected when absent.")

    @field_validator("question", "text", "prompt")
    @classmethod
    def _not_blank(cls, value):
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("options")
    @classmethod
    def _options_not_blank(cls, value):
        if value is not None and any(not option.strip() for option in value):
            raise ValueError("options must not be empty strings")
        return value

    @model_validator(mode="after")
    def _one_kind(self):
        mcq = self.question is not None or self.options is not None
        content = self.text is not None or self.prompt is not None
        if mcq and content:
            raise ValueError("give either question + options, or text / prompt to judge, not both")
        if not mcq and not content:
            raise ValueError("give question + options, or text and/or prompt to judge")
        if mcq and (self.question is None or self.options is None):
            raise ValueError("a multiple-choice question needs both question and options")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # clients add fields (name, ...) we do not need
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # OpenAI clients send options we do not implement

    model: str | None = None  # one model per endpoint: any name is answered by it
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHAT_N)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | list[str] | None = None
    stream: bool = False

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value):
        if value:
            raise ValueError("streaming is not supported; send stream=false")
        return value


class ApiError(Exception):
    """A client error with its HTTP status; the message is shown to the client."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "param": param, "code": status}}, status_code=status)


# --- the judgement itself: plain functions of an engine, shared by the deployment and the benchmark ---


@dataclass
class JudgeItem:
    """A validated judge request, as the model will see it."""

    kind: str  # "mcq", "text", "request" or "response"
    lang: str
    question: str
    options: list[str]

    def variant(self) -> dict:
        """The question as an original variant: default labels and framing, what the model was trained on."""
        labels = labels_for(DEFAULT_STYLE, len(self.options))
        return {"lang": self.lang, "question": self.question, "options": self.options, "labels": labels, "framing": 0}


def judge_item(request: JudgeRequest) -> JudgeItem:
    if request.question is not None:
        lang = request.lang or detect_lang(request.question + "\n" + "\n".join(request.options))
        return JudgeItem("mcq", lang, request.question, list(request.options))
    lang = request.lang or detect_lang("\n".join(t for t in (request.prompt, request.text) if t))
    if request.text is None:
        return JudgeItem("request", lang, judge_question(lang, "request", request.prompt), judge_options(lang))
    if request.prompt is None:
        return JudgeItem("text", lang, judge_question(lang, "text", request.text), judge_options(lang))
    return JudgeItem("response", lang, judge_question(lang, "response", request.text, context=request.prompt),
                     judge_options(lang))


def judge_batch(engine, items: list[JudgeItem], max_tokens: int, stop: list[str]) -> list[dict]:
    """Answer and confidence of every item: one greedy generate call for the batch, then one option-scoring
    call for the items whose reply states no confidence (or no readable answer)."""
    from safeconf.evaluation.methods import ANSWER_PREFIX, softmax

    variants = [item.variant() for item in items]
    replies = engine.generate([render_messages(v) for v in variants], n=1, temperature=0.0, top_p=1.0,
                              max_tokens=max_tokens, stop=stop)
    parsed = [parse_answer(reply.text, v["options"], v["labels"]) for (reply,), v in zip(replies, variants)]
    unsure = [i for i, p in enumerate(parsed) if p.choice is None or p.confidence is None]
    probs = {}
    if unsure:
        logprobs = engine.option_logprobs([render_messages(variants[i]) for i in unsure],
                                          [ANSWER_PREFIX[variants[i]["lang"]] for i in unsure],
                                          [variants[i]["labels"] for i in unsure])
        probs = {i: softmax(lps) for i, lps in zip(unsure, logprobs)}
    answers = []
    for i, (item, variant, p, (reply,)) in enumerate(zip(items, variants, parsed, replies)):
        if i not in probs:
            choice, confidence, answer_source, confidence_source = p.choice, p.confidence, "reply", "stated"
        else:
            # The reply stated no confidence: the option probability stands in (of the answer the reply gave,
            # or of the likeliest option when the reply gave none).
            choice = p.choice if p.choice is not None else max(range(len(probs[i])), key=probs[i].__getitem__)
            confidence, confidence_source = probs[i][choice], "option_probability"
            answer_source = "reply" if p.choice is not None else "option_probability"
        answers.append({
            "kind": item.kind, "lang": item.lang, "answer_index": choice, "answer_label": variant["labels"][choice],
            "answer_text": item.options[choice], "confidence": min(max(float(confidence), 0.0), 1.0),
            "confidence_source": confidence_source, "answer_source": answer_source, "reply": reply.text,
        })
    return answers


def decide(confidence: float, threshold: float | None) -> str:
    """Accept when the confidence reaches the threshold; no threshold (none was safe enough) defers all."""
    return "accept" if threshold is not None and confidence >= threshold - _EPS else "defer"


def resolve_threshold(config: Config) -> tuple[float | None, str]:
    """(threshold, where it came from): serve.threshold, or the calibrated one in serve.metrics_path."""
    serve_cfg = config.serve
    if not serve_cfg.metrics_path:
        return serve_cfg.threshold, "serve.threshold"
    from safeconf import io

    metrics = io.read_json(serve_cfg.metrics_path)
    method = serve_cfg.threshold_method or ("safeconf" if config.model.adapter else "verbalized")
    methods = metrics.get("methods", {}) if isinstance(metrics, dict) else {}
    if method not in methods or "selective" not in methods[method]:
        raise ValueError(f"{serve_cfg.metrics_path}: no selective threshold for method {method!r}; it has "
                         f"{sorted(methods)} (set serve.threshold_method)")
    # None means no threshold kept the error under eval.alpha on the calibration split: defer everything.
    return methods[method]["selective"]["threshold"], f"{serve_cfg.metrics_path} ({method})"


# --- HTTP: the FastAPI app. Middleware and handlers must be registered before @serve.ingress freezes it. ---

api = FastAPI(title="SafeConf", description="Calibrated safety judgements", docs_url=None, redoc_url=None,
              openapi_url=None)  # no schema pages: less surface, and nothing to show before auth


def _server() -> "JudgeServer":
    """The deployment instance of this replica (how Serve itself injects `self` into routes)."""
    return serve.get_replica_context().servable_object


class GuardMiddleware:
    """Auth and body size, checked before FastAPI reads (or parses) a byte of the body: a request without the
    token gets 401 and nothing else happens. Plain ASGI, so it runs first and costs nearly nothing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].endswith(HEALTH_PATH):
            return await self.app(scope, receive, send)
        server = _server()
        headers = dict(scope["headers"])
        refusal = None
        if not server.authorized(headers.get(b"authorization", b"")):
            refusal = error_response(401, "authentication_error", "missing or wrong bearer token")
            refusal.headers["WWW-Authenticate"] = "Bearer"
        elif _content_length(headers) > server.config.serve.max_request_bytes:
            refusal = error_response(413, "invalid_request_error",
                                     f"request body over {server.config.serve.max_request_bytes} bytes")
        if refusal is None:
            return await self.app(scope, receive, send)
        server.metrics.count(route_tag(scope["path"]), refusal.status_code)
        await refusal(scope, receive, send)


def route_tag(path: str) -> str:
    """The metrics tag of a path: a known route, else "other" (clients must not mint new time series)."""
    return next((route for route in ROUTES if path.endswith(route)), "other")


def _content_length(headers: dict) -> int:
    try:
        return int(headers.get(b"content-length", b"0"))
    except ValueError:
        return 0


api.add_middleware(GuardMiddleware)


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError):
    """422 naming each bad field; the input is not echoed back (it may be large, or someone's secret)."""
    problems = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            problems.append(("body", "not valid JSON"))
            continue
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append((where, str(error.get("msg", "invalid")).removeprefix("Value error, ")))
    _server().metrics.count(route_tag(request.url.path), 422)
    message = "; ".join(f"{where}: {msg}" for where, msg in problems)
    return error_response(422, "invalid_request_error", message, problems[0][0] if problems else None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    """404 / 405 and friends in the same JSON shape as every other error."""
    return error_response(exc.status_code, "invalid_request_error", str(exc.detail))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    """Last resort (routes catch their own errors): a 500 without internals; the trace goes to the log."""
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal_error", "internal error; see the server log")


# --- metrics: Ray's Prometheus metrics, tagged with the deployment and replica by Serve ---


class Metrics:
    LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("safeconf_requests", description="HTTP requests by route and status.",
                                tag_keys=("path", "status"))
        self.latency = Histogram("safeconf_request_latency_s", description="Request latency in seconds.",
                                 boundaries=self.LATENCY_BOUNDS, tag_keys=("path",))
        self.judgements = Counter("safeconf_judgements", description="Judgements by decision (accept / defer) "
                                  "and confidence source.", tag_keys=("decision", "confidence_source"))

    def count(self, path: str, status: int, seconds: float | None = None):
        self.requests.inc(tags={"path": path, "status": str(status)})
        if seconds is not None:
            self.latency.observe(seconds, tags={"path": path})


# --- the deployment ---


class JudgeServer:
    """One replica: one engine (one model copy), its batches, and the routes.

    A plain module-level class (decorated below, not with @), so Ray pickles it by reference and the
    replica runs this module's code as imported there.
    """

    def __init__(self, config: dict, token_digest: str | None):
        self.config = config_from_dict(config)
        self.token_digest = token_digest  # SHA-256 of the token: the plain token never enters Ray's state
        self.model_id = self.config.serve.model_id or self.config.model.name
        self.metrics = Metrics()
        self.engine_batches = 0  # calls to the engine thread (judge_batch / chat_batch)
        self.waiting, self.runner = [], None  # batches waiting for the engine, and the task that feeds it
        self.threshold, self.threshold_source = self.config.serve.threshold, "serve.threshold"
        self.timeout_s = self.config.serve.request_timeout_s
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

    def _make_engine(self):
        from safeconf.engines import make_engine

        return make_engine(self.config.model, self.config.engine, seed=self.config.sampling.seed)

    def reconfigure(self, user_config: dict):
        """Serve's user_config: the threshold and the timeout change without reloading the model."""
        if "threshold" in user_config:
            self.threshold = user_config["threshold"]
            self.threshold_source = user_config.get("threshold_source", "user_config")
        if "request_timeout_s" in user_config:
            self.timeout_s = float(user_config["request_timeout_s"])

    def authorized(self, header: bytes) -> bool:
        if self.token_digest is None:
            return True
        scheme, _, token = header.decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self.token_digest)

    def replica_info(self) -> dict:
        """For operators and tests, through a deployment handle (not HTTP)."""
        return {"pid": os.getpid(), "engine_batches": self.engine_batches, "threshold": self.threshold,
                "threshold_source": self.threshold_source, "timeout_s": self.timeout_s}

    # routes

    @api.get(HEALTH_PATH)
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0, "owned_by": "safeconf"}]}

    @api.post("/v1/judge")
    async def judge(self, body: JudgeRequest) -> JSONResponse:
        return await self._answer("/v1/judge", self._judge(body))

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest) -> JSONResponse:
        return await self._answer("/v1/chat/completions", self._chat(body))

    async def _answer(self, path: str, work) -> JSONResponse:
        """Run a route's work under the timeout; map every outcome to JSON (never a trace) and count it."""
        started = time.perf_counter()
        try:
            response = JSONResponse(await asyncio.wait_for(work, self.timeout_s))
        except ApiError as e:
            response = error_response(e.status, e.kind, e.message, e.param)
        except asyncio.TimeoutError:
            response = error_response(504, "timeout", f"no answer within {self.timeout_s} s (serve.request_timeout_s)")
        except Exception:
            log.exception("error answering %s", path)
            response = error_response(500, "internal_error", "internal error; see the server log")
        self.metrics.count(path, response.status_code, time.perf_counter() - started)
        return response

    # judge

    async def _judge(self, body: JudgeRequest) -> dict:
        self._check_judge_limits(body)
        answer = await self._judge_batch(judge_item(body))
        threshold = self.threshold
        decision = decide(answer["confidence"], threshold)
        self.metrics.judgements.inc(tags={"decision": decision, "confidence_source": answer["confidence_source"]})
        return {**answer, "decision": decision, "threshold": threshold, "model": self.model_id}

    def _check_judge_limits(self, body: JudgeRequest):
        limits = self.config.serve
        for name in ("question", "text", "prompt"):
            value = getattr(body, name)
            if value is not None and len(value) > limits.max_text_chars:
                raise ApiError(422, f"{name}: longer than {limits.max_text_chars} characters", name)
        if body.options is not None:
            if len(body.options) > limits.max_options:
                raise ApiError(422, f"options: at most {limits.max_options} options, got {len(body.options)}", "options")
            if any(len(option) > limits.max_option_chars for option in body.options):
                raise ApiError(422, f"options: an option is longer than {limits.max_option_chars} characters", "options")

    # The sizes from the config are set in __init__. Several formed batches may wait at once: _on_engine merges them.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=4)
    async def _judge_batch(self, items: list[JudgeItem]) -> list[dict]:
        sampling = self.config.sampling
        return await self._on_engine(judge_batch, items, sampling.max_tokens, sampling.stop)

    async def _on_engine(self, fn, requests: list, *args):
        """fn(self.engine, requests, *args) on the engine thread, merged with the batches that queued meanwhile.

        @serve.batch forms its next batch as soon as the previous one is handed over, not when the engine is free,
        so behind a busy engine it queues many small batches; merging what waits into one call keeps the batches
        full (measured on the embedded model at concurrency 8: mostly 1-3 requests per engine call without it).
        """
        done = asyncio.get_running_loop().create_future()
        self.waiting.append((fn, args, requests, done))
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run_waiting())
        return await done

    async def _run_waiting(self):
        loop, limit = asyncio.get_running_loop(), self.config.serve.max_batch_size
        while self.waiting:
            fn, args = self.waiting[0][:2]
            group, size = [], 0
            for entry in self.waiting:  # same function and settings, up to max_batch_size requests (at least one)
                if entry[0] is fn and entry[1] == args and (not group or size + len(entry[2]) <= limit):
                    group.append(entry)
                    size += len(entry[2])
            taken = {id(entry) for entry in group}
            self.waiting = [entry for entry in self.waiting if id(entry) not in taken]
            requests = [request for entry in group for request in entry[2]]
            self.engine_batches += 1
            started = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self.executor, fn, self.engine, requests, *args)
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

    async def _chat(self, body: ChatRequest) -> dict:
        request = self._chat_item(body)
        answer = await self._chat_batch(request)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": "length" if len(c.token_ids) >= request["max_tokens"] else "stop"}
                   for i, c in enumerate(answer["completions"])]
        completion_tokens = sum(len(c.token_ids) for c in answer["completions"])
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_id, "choices": choices,
            "usage": {"prompt_tokens": answer["prompt_tokens"], "completion_tokens": completion_tokens,
                      "total_tokens": answer["prompt_tokens"] + completion_tokens},
        }

    def _chat_item(self, body: ChatRequest) -> dict:
        limits = self.config.serve
        if len(body.messages) > limits.max_chat_messages:
            raise ApiError(422, f"messages: at most {limits.max_chat_messages} messages", "messages")
        messages = [m.plain() for m in body.messages]
        if any(len(m["content"]) > limits.max_text_chars for m in messages):
            raise ApiError(422, f"messages: a message is longer than {limits.max_text_chars} characters", "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(256, limits.max_chat_tokens)
        if max_tokens > limits.max_chat_tokens:
            raise ApiError(422, f"max_tokens: at most {limits.max_chat_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return {"messages": messages, "n": body.n, "temperature": body.temperature, "top_p": body.top_p,
                "max_tokens": max_tokens, "stop": stop}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=4)
    async def _chat_batch(self, requests: list[dict]) -> list[dict]:
        return await self._on_engine(chat_batch, requests)


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


JudgeDeployment = serve.deployment(name="SafeConfJudge")(serve.ingress(api)(JudgeServer))


# --- building and running the application ---


def deployment_options(config: Config) -> dict:
    """Serve options of the deployment, from the config (plain data: checked in tests without a cluster)."""
    serve_cfg, engine = config.serve, config.engine
    actor = {"num_cpus": engine.num_cpus, "runtime_env": engine_runtime_env(engine)}
    if engine.memory_gib:
        actor["memory"] = int(engine.memory_gib * 1024**3)
    options = {
        "autoscaling_config": {
            "min_replicas": serve_cfg.min_replicas,
            "initial_replicas": serve_cfg.min_replicas,
            "max_replicas": serve_cfg.max_replicas,
            "target_ongoing_requests": serve_cfg.target_ongoing_requests,
        },
        "max_ongoing_requests": serve_cfg.max_ongoing_requests,
        "max_queued_requests": serve_cfg.max_queued_requests,
        "ray_actor_options": actor,
    }
    bundles = placement_bundles(engine)
    if bundles:  # the replica coordinates vLLM's own per-GPU workers in one placement group
        options["placement_group_bundles"] = bundles
    else:
        actor["num_gpus"] = engine.num_gpus
    return options


def auth_token_digest(config: Config) -> str | None:
    """SHA-256 of the token in the variable serve.auth_token_env, read where the app is built (the CLI, or
    Serve's app-building task under `serve run` / RayService); None when auth is off."""
    name = config.serve.auth_token_env
    token = os.environ.get(name, "").strip() if name else ""
    if not token:
        if config.serve.require_auth:
            raise ValueError(f"serve.require_auth is set but ${name or '(serve.auth_token_env empty)'} holds no token")
        log.warning("SafeConf endpoint without auth: $%s is not set", name)
        return None
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def build_app(config: Config):
    """The Serve application of the config (`serve.run(build_app(config))`)."""
    config.validate()
    problems = config.serve.problems()
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    config = _with_absolute_paths(config)
    threshold, source = resolve_threshold(config)
    user_config = {"threshold": threshold, "threshold_source": source,
                   "request_timeout_s": config.serve.request_timeout_s}
    deployment = JudgeDeployment.options(user_config=user_config, **deployment_options(config))
    return deployment.bind(config.to_dict(), auth_token_digest(config))


def _with_absolute_paths(config: Config) -> Config:
    """A copy whose local relative model / adapter paths are absolute: replicas do not run in this directory."""
    config = config_from_dict(config.to_dict())
    for section, key in ((config.model, "name"), (config.model, "adapter")):
        value = getattr(section, key)
        if value and value != "embedded" and "://" not in value and os.path.exists(value):
            setattr(section, key, os.path.abspath(value))
    return config


def app_builder(args: dict):
    """For `serve run safeconf.serving:app_builder config=FILE model.adapter=DIR ...` and RayService `args`:
    `config` names a YAML file, every other key is a config override."""
    args = {str(k): str(v) for k, v in (args or {}).items()}
    path = args.pop("config", None) or os.environ.get("SAFECONF_CONFIG")
    return build_app(load_config(path, [f"{k}={v}" for k, v in args.items()]))


def __getattr__(name: str):
    """`safeconf.serving:app`, built on first use from $SAFECONF_CONFIG (a YAML file) or the defaults, so that
    importing this module (in every replica) builds nothing."""
    if name == "app":
        app = build_app(load_config(os.environ.get("SAFECONF_CONFIG") or None))
        globals()["app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run_serve(config: Config, port: int | None = None, blocking: bool = True) -> str:
    """Start Serve (on config.ray_address, or a local Ray) with the SafeConf application; returns its URL.

    blocking=True keeps this process (and a local Ray it started) alive until Ctrl-C, then deletes the app.
    """
    from safeconf.pipeline import init_ray

    init_ray(config.ray_address)
    port = port or config.serve.port
    serve.start(http_options={"host": config.serve.host, "port": port})
    serve.run(build_app(config), name=config.serve.app_name, route_prefix=config.serve.route_prefix)
    url = f"http://{config.serve.host}:{port}{config.serve.route_prefix.rstrip('/')}"
    log.info("SafeConf endpoint at %s (POST /v1/judge, POST /v1/chat/completions, GET /healthz)", url)
    if not blocking:
        return url
    print(f"SafeConf endpoint at {url}; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(config.serve.app_name)
    return url


__all__ = ["JudgeRequest", "ChatRequest", "build_app", "app_builder", "run_serve", "judge_batch", "judge_item",
           "decide", "resolve_threshold", "deployment_options", "JudgeDeployment"]
