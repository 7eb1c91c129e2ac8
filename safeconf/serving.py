"""The Ray Serve endpoint: calibrated safety judgements over HTTP, and an OpenAI-compatible chat route.

Routes (JSON in, JSON out; errors are `{"error": {"type", "message", "param"}}`, the shape OpenAI clients read):
- `POST /v1/judge`: a multiple-choice question (`question` + `options`), or content to judge: `text` alone
  (is this text safe?), `prompt` alone (is it safe to comply with this request?), or both (is this response to
  the prompt safe?). Answer: the option, the model's confidence in it, and `accept` / `defer` against the
  threshold (serve.threshold, or the one `safeconf evaluate` calibrated, read from its metrics.json).
- `POST /v1/chat/completions`, `GET /v1/models`: the subset of the OpenAI API common clients use.
- `GET /healthz`: liveness, without auth (for load balancers and Kubernetes probes).

The judgement is exactly one evaluated method, named in every answer (`method`): the evaluation's own code
(evaluation.methods.judge) with the same prompt, parsing and fallbacks, and, with serve.metrics_path, the
settings of that evaluation (eval.missing_confidence, sampling.max_tokens, sampling.stop from metrics.json's
config), so the threshold's guarantee covers the endpoint's answers. The method is serve.threshold_method;
by default `safeconf` (verbalized on the adapter) when model.adapter is set, else `verbalized` with a
metrics.json and `token_prob` without one. Per method:
- verbalized / safeconf: the stated confidence; a reply that states none gets eval.missing_confidence, as in
  the calibration (`fallback: true`, `confidence_source: "missing_confidence"`).
- token_prob: the likeliest option label and its probability over the options.
- p_true: P(True) of the greedy answer (of the token_prob answer where the reply is unreadable: `fallback`).
A reply that names no readable option (the evaluation counts it wrong) comes back as `status: "unreadable"`,
`answer_index` / `answer_label` / `answer_text` null, and is always deferred. With no calibrated threshold
(metrics.json's is null: too few calibration questions, or none safe enough) every judgement is deferred,
and the start-up log says why.

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
from safeconf.evaluation.methods import (
    ADAPTER_METHODS,
    JUDGE_METHODS,
    SAMPLING_METHODS,
    Judgement,
    JudgeSettings,
    engine_method,
    judge,
)
from safeconf.evaluation.selective import min_accepted
from safeconf.mutations import detect_lang
from safeconf.prompts import DEFAULT_STYLE, labels_for

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


def judge_batch(engine, items: list[JudgeItem], method: str, settings: JudgeSettings) -> list[dict]:
    """The answer of every item by one evaluated method, through the evaluation's own judging code
    (evaluation.methods.judge: the same prompt, parsing and fallbacks, one engine call per step for the batch)."""
    variants = [item.variant() for item in items]
    answers = []
    for item, variant, found in zip(items, variants, judge(engine, variants, method, settings)):
        readable = found.choice is not None
        confidence_source, answer_source = _sources(method, found)
        answers.append({
            "kind": item.kind, "lang": item.lang, "method": method,
            "status": "answered" if readable else "unreadable",
            "answer_index": found.choice, "answer_label": variant["labels"][found.choice] if readable else None,
            "answer_text": item.options[found.choice] if readable else None, "confidence": found.confidence,
            "fallback": found.fallback, "confidence_source": confidence_source, "answer_source": answer_source,
            "reply": found.text, "truncated": found.truncated,
        })
    return answers


def _sources(method: str, found: Judgement) -> tuple[str, str | None]:
    """(where the confidence came from, where the answer came from) of a judgement, for clients and metrics."""
    name = engine_method(method)
    if name == "verbalized":
        return ("missing_confidence" if found.fallback else "stated"), ("reply" if found.choice is not None else None)
    if name == "token_prob":
        return "option_probability", "option_probability"
    return "p_true", ("option_probability" if found.fallback else "reply")


def decide(confidence: float, threshold: float | None) -> str:
    """Accept when the confidence reaches the threshold; no threshold (none was safe enough) defers all."""
    return "accept" if threshold is not None and confidence >= threshold - _EPS else "defer"


def with_decision(answer: dict, threshold: float | None) -> dict:
    """A judge_batch answer with its decision and threshold. An unreadable answer, which the evaluation counts
    wrong, is never accepted."""
    decision = "defer" if answer["answer_index"] is None else decide(answer["confidence"], threshold)
    return {**answer, "decision": decision, "threshold": threshold}


@dataclass
class JudgePolicy:
    """What the endpoint serves: one evaluated method, its threshold, and the settings it was evaluated with."""

    method: str  # verbalized, token_prob, p_true (base model) or safeconf (the adapter)
    threshold: float | None  # None: no threshold was safe enough; every judgement is deferred
    source: str  # where the threshold came from
    settings: JudgeSettings

    def user_config(self) -> dict:
        """As Serve's user_config (plain JSON), which replicas receive through `reconfigure`."""
        return {"method": self.method, "threshold": self.threshold, "threshold_source": self.source,
                "judging": self.settings.to_dict()}

    @classmethod
    def from_user_config(cls, values: dict, current: "JudgePolicy | None" = None) -> "JudgePolicy":
        """The policy a user_config sets: its keys over the current policy's."""
        merged = {**(current.user_config() if current else {}), **values}
        if "threshold" in values and "threshold_source" not in values:
            merged["threshold_source"] = "user_config"
        missing = sorted(POLICY_KEYS - merged.keys())
        if missing:
            raise ValueError(f"user_config lacks {missing}: build the application with safeconf.serving.build_app")
        judging = merged["judging"]
        settings = JudgeSettings(int(judging["max_tokens"]), tuple(judging["stop"]), float(judging["missing_confidence"]))
        return cls(merged["method"], merged["threshold"], merged.get("threshold_source", "user_config"), settings)


POLICY_KEYS = {"method", "threshold", "judging"}


def check_servable(method: str, has_adapter: bool) -> None:
    """The endpoint serves a method only on the model it was evaluated on: the base-model methods without an
    adapter, safeconf (verbalized on the fine-tuned adapter) with one."""
    if method in ADAPTER_METHODS:
        if not has_adapter:
            raise ValueError(f"serve method {method!r} is {engine_method(method)} on the fine-tuned adapter: set "
                             "model.adapter (or --adapter)")
        return
    if method not in JUDGE_METHODS:
        raise ValueError(f"serve.threshold_method {method!r} cannot be served: the endpoint answers with a "
                         f"per-question method, one of {list(JUDGE_METHODS) + list(ADAPTER_METHODS)}"
                         + (" (the sampling methods need k samples per question)" if method in SAMPLING_METHODS else ""))
    if has_adapter:
        raise ValueError(f"serve method {method!r} was evaluated on the base model, but model.adapter is set: serve "
                         "'safeconf' (the adapter's method), or serve without the adapter")


def resolve_policy(config: Config) -> JudgePolicy:
    """The method, threshold and judging settings to serve.

    With serve.metrics_path (metrics.json of `safeconf evaluate`): the calibrated threshold of
    serve.threshold_method (default safeconf with an adapter, else verbalized), judged with the settings the
    evaluation used (eval.missing_confidence, sampling.max_tokens and sampling.stop of metrics.json's config),
    so the endpoint's judgements are the evaluated ones. Without: serve.threshold, for serve.threshold_method
    (default safeconf with an adapter, else token_prob: the base model's option probability, since the
    verbalized confidence of an untuned model is mostly the eval.missing_confidence stand-in).
    """
    serve_cfg, has_adapter = config.serve, bool(config.model.adapter)
    if not serve_cfg.metrics_path:
        method = serve_cfg.threshold_method or ("safeconf" if has_adapter else "token_prob")
        check_servable(method, has_adapter)
        why = "serve.threshold_method" if serve_cfg.threshold_method else "default without serve.metrics_path"
        log.info("serving method %s (%s) with serve.threshold %s (not calibrated)", method, why, serve_cfg.threshold)
        return JudgePolicy(method, serve_cfg.threshold, "serve.threshold", JudgeSettings.of(config))
    from safeconf import io

    path = serve_cfg.metrics_path
    metrics = io.read_json(path)
    method = serve_cfg.threshold_method or ("safeconf" if has_adapter else "verbalized")
    check_servable(method, has_adapter)
    methods = metrics.get("methods", {}) if isinstance(metrics, dict) else {}
    if method not in methods or "selective" not in methods[method]:
        raise ValueError(f"{path}: no selective threshold for method {method!r}; it has {sorted(methods)} "
                         "(set serve.threshold_method)")
    if not isinstance(metrics.get("config"), dict):
        raise ValueError(f"{path}: no 'config' section, so how the evaluation judged (eval.missing_confidence, "
                         "sampling.max_tokens, sampling.stop) is unknown; re-run `safeconf evaluate`")
    settings = JudgeSettings.of(metrics["config"])
    own = JudgeSettings.of(config)
    if own != settings:
        log.warning("judging as the evaluation in %s did: %s (this config's %s not used)", path, settings, own)
    evaluated = {"model": config.model.name, **({"adapter": config.model.adapter} if method in ADAPTER_METHODS else {})}
    for key, served in evaluated.items():
        if metrics.get(key) is not None and not _same_location(metrics[key], served):
            log.warning("%s: evaluated %s %r, serving %r: the calibrated threshold may not hold", path, key,
                        metrics[key], served)
    selective = methods[method]["selective"]
    threshold = selective["threshold"]
    if threshold is None:
        log.warning("%s", no_threshold_reason(path, method, selective))
    return JudgePolicy(method, threshold, f"{path} ({method})", settings)


def _same_location(a: str, b: str) -> bool:
    """Two model / adapter names that name the same thing (a relative and an absolute local path alike)."""
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def no_threshold_reason(path: str, method: str, selective: dict) -> str:
    """Why every judgement will be deferred: the calibration set was too small, or no threshold was safe."""
    alpha, delta, calibration = selective["alpha"], selective["delta"], selective["calibration_questions"]
    needed = min_accepted(alpha, delta)
    if calibration < needed:
        why = (f"calibration set of {calibration} questions < {needed} needed to set any threshold at "
               f"alpha={alpha}, delta={delta}")
    else:
        why = (f"no threshold kept the error of accepted judgements under alpha={alpha} (delta={delta}) on "
               f"{calibration} calibration questions")
    return f"{path}: method {method} has no selective threshold ({why}): every judgement will be deferred"


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
        self.judgements = Counter("safeconf_judgements", description="Judgements by method, decision (accept / "
                                  "defer) and confidence source.", tag_keys=("method", "decision", "confidence_source"))

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
        self.policy: JudgePolicy | None = None  # set by reconfigure from build_app's user_config, before traffic
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
        """Serve's user_config: the judging policy (method, threshold, judging settings) and the timeout change
        without reloading the model; a partial update keeps the rest of the policy."""
        if POLICY_KEYS & user_config.keys():
            policy = JudgePolicy.from_user_config(user_config, self.policy)
            check_servable(policy.method, bool(self.config.model.adapter))
            self.policy = policy
            log.info("judging with %s", policy)
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
        policy = self.policy
        return {"pid": os.getpid(), "engine_batches": self.engine_batches, "method": policy.method,
                "threshold": policy.threshold, "threshold_source": policy.source,
                "judging": policy.settings.to_dict(), "timeout_s": self.timeout_s}

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
        answer = with_decision(await self._judge_batch(judge_item(body)), self.policy.threshold)
        self.metrics.judgements.inc(tags={"method": answer["method"], "decision": answer["decision"],
                                          "confidence_source": answer["confidence_source"]})
        return {**answer, "model": self.model_id}

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
        policy = self.policy
        return await self._on_engine(judge_batch, items, policy.method, policy.settings)

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
    user_config = {**resolve_policy(config).user_config(), "request_timeout_s": config.serve.request_timeout_s}
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
           "decide", "with_decision", "resolve_policy", "JudgePolicy", "deployment_options", "JudgeDeployment"]
