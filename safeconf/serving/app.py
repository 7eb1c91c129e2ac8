"""HTTP: the front deployment (the application's ingress). It owns the routes, its guard middleware (auth and body
size before the body is read), the JSON error handlers, request validation and the limits, and the HTTP metrics;
it holds no model. Each request's work goes to the engine deployment (safeconf.serving.deployment.JudgeServer)
through a DeploymentHandle, with the request's served model as Serve's multiplexed model id.

Why a separate front: an engine replica that dies (out of memory, a killed process) takes the requests it holds
with it. Were it the ingress, Serve's proxy would answer those with a bare 500 or drop the connection; here the
front sees the handle call fail and answers 503 with Retry-After (serve.retry_after_s) in the error shape, as for
an engine that is restarting or busy: no replica took the request within serve.request_timeout_s, the queue of
serve.max_queued_requests is full, or the time the request waited for a replica left too little to answer. A
replica that had the whole serve.request_timeout_s and could not answer gives 504; anything else unexpected 500,
without internals.

Middleware and handlers are registered here, before @serve.ingress (in safeconf.serving.deployment) freezes the
app; the routes are JudgeFront's methods.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from safeconf.config import config_from_dict
from safeconf.evaluation.methods import UNREADABLE_P_UNSAFE
from safeconf.serving.judging import judge_item, text_item
from safeconf.serving.metrics import Metrics
from safeconf.serving.schemas import (
    MODERATION_CATEGORY,
    ApiError,
    ChatRequest,
    JudgeRequest,
    ModerationRequest,
    ModerationResponse,
    error_response,
)
from safeconf.serving.unavailable import Unanswered, failure_response, running_replicas, unavailable_response

log = logging.getLogger("ray.serve")

HEALTH_PATH = "/healthz"
ROUTES = ("/v1/judge", "/v1/moderations", "/v1/chat/completions", "/v1/models", HEALTH_PATH)
MAIN = ""  # the name of the main model (model.name + model.adapter) among the served ones
# The front waits this much longer than the engine's own deadline, so an engine that took the request answers
# first (504, or its answer); past it, no engine replica took the request.
ENGINE_GRACE_S = 2.0
# How long the front trusts its last look at the engine deployment's replicas (Serve's controller): with none
# RUNNING, a request is refused at once (503 + Retry-After) instead of waiting serve.request_timeout_s for one.
REPLICA_CHECK_S = 1.0

api = FastAPI(title="SafeConf", description="Calibrated safety judgements", docs_url=None, redoc_url=None,
              openapi_url=None)  # no schema pages: less surface, and nothing to show before auth


def _server():
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


# --- the front deployment ---


class JudgeFront:
    """The ingress: routes, auth, validation and limits here; the judging on the engine deployment (`engine`, a
    DeploymentHandle of JudgeServer). One coroutine per request and no model: a small CPU share suffices.

    A plain module-level class (decorated in safeconf.serving.deployment, not with @), so Ray pickles it by
    reference and the replica runs this module's code as imported there.
    """

    def __init__(self, engine, config: dict, token_digest: str | None):
        self.engine = engine
        self.config = config_from_dict(config)
        self.token_digest = token_digest  # SHA-256 of the token: the plain token never enters Ray's state
        self.model_id = self.config.serve.model_id or self.config.model.name
        self.adapter_names = [entry["name"] for entry in self.config.serve.adapters]
        self.timeout_s = self.config.serve.request_timeout_s
        self.retry_after_s = self.config.serve.retry_after_s
        self.handles: dict[tuple[str, str], object] = {}  # (method, model) -> handle with those options
        self.metrics = Metrics()
        self.replicas_checked_at, self.engine_running = -math.inf, True

    async def engine_is_up(self) -> bool:
        """Whether the engine deployment has a RUNNING replica, as Serve's controller last said (looked up at most
        every REPLICA_CHECK_S, one lookup at a time; if the lookup fails, up: the request then takes its chances)."""
        now = time.monotonic()
        if now - self.replicas_checked_at >= REPLICA_CHECK_S:
            self.replicas_checked_at = now
            try:
                self.engine_running = await asyncio.to_thread(running_replicas, self.engine.deployment_name) > 0
            except Exception as error:  # a controller that cannot be asked must not refuse every request
                log.warning("could not read the engine's replicas from Serve: %s", error)
                self.engine_running = True
        return self.engine_running

    def reconfigure(self, user_config: dict):
        """Serve's user_config of the front: request_timeout_s and retry_after_s change without a restart."""
        if "request_timeout_s" in user_config:
            self.timeout_s = float(user_config["request_timeout_s"])
        if "retry_after_s" in user_config:
            self.retry_after_s = float(user_config["retry_after_s"])

    def authorized(self, header: bytes) -> bool:
        if self.token_digest is None:
            return True
        scheme, _, token = header.decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self.token_digest)

    def served_model(self, requested: str | None) -> str:
        """The served model a request's `model` names: an adapter of serve.adapters, or MAIN for none, model_id,
        or (with no adapters to choose from) any name, as OpenAI-compatible servers of one model answer."""
        if requested in self.adapter_names:
            return requested
        if requested is None or requested == self.model_id or not self.adapter_names:
            return MAIN
        raise ApiError(404, f"model {requested!r} is not served here; served: "
                       f"{[self.model_id, *self.adapter_names]}", "model", "model_not_found")

    def name_of(self, name: str) -> str:
        return self.model_id if name == MAIN else name

    # routes

    @api.get(HEALTH_PATH)
    async def healthz(self) -> dict:
        """Liveness of the front (no engine call: a probe must not queue behind the model)."""
        return {"status": "ok", "model": self.model_id}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "safeconf"}
                                           for name in (self.model_id, *self.adapter_names)]}

    @api.post("/v1/judge")
    async def judge(self, body: JudgeRequest) -> JSONResponse:
        return await self._answer("/v1/judge", self._judge(body))

    @api.post("/v1/moderations")
    async def moderations(self, body: ModerationRequest) -> JSONResponse:
        return await self._answer("/v1/moderations", self._moderate(body))

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest) -> JSONResponse:
        return await self._answer("/v1/chat/completions", self._chat(body))

    async def _answer(self, path: str, work) -> JSONResponse:
        """Map every outcome of a route's work to JSON (never a trace) and count it."""
        started = time.perf_counter()
        try:
            response = JSONResponse(await work)
        except ApiError as e:
            response = error_response(e.status, e.kind, e.message, e.param)
        except Unanswered as e:
            response = e.response
        except Exception:
            log.exception("error answering %s", path)
            response = error_response(500, "internal_error", "internal error; see the server log")
        self.metrics.count(path, response.status_code, time.perf_counter() - started)
        return response

    async def call_engine(self, method: str, name: str, *args):
        """engine.method(name, *args) on a replica that serves model `name` (Serve's model multiplexing routes
        to one that has it loaded), bounded: the engine gets the deadline, the front waits ENGINE_GRACE_S
        longer. Its answer, or Unanswered with the response to send (503 + Retry-After when no replica could
        answer: dead, restarting, busy past the deadline or the queue full)."""
        key = (method, name)
        if key not in self.handles:
            self.handles[key] = self.engine.options(method_name=method, multiplexed_model_id=name)
        timeout_s, retry_after_s = self.timeout_s, self.retry_after_s
        if not await self.engine_is_up():  # all dead or starting: nothing can answer within the timeout's worth
            raise Unanswered(unavailable_response("no judge replica is running (all are starting or restarting); "
                                                  "retry after the Retry-After seconds", retry_after_s))
        deadline = time.time() + timeout_s  # wall clock: the engine may run on another node
        response = None
        try:
            response = self.handles[key].remote(name, *args, deadline=deadline)
            envelope = await asyncio.wait_for(_awaited(response), timeout_s + ENGINE_GRACE_S)
        except asyncio.TimeoutError:
            _cancel(response)
            raise Unanswered(unavailable_response(
                f"no replica took the request within {timeout_s:g} s (serve.request_timeout_s): the judge is "
                "restarting or busy", retry_after_s)) from None
        except Exception as error:
            raise Unanswered(failure_response(error, retry_after_s)) from None
        if "error" in envelope:
            e = envelope["error"]
            if e["status"] == 503:
                raise Unanswered(unavailable_response(e["message"], retry_after_s))
            raise Unanswered(error_response(e["status"], e["type"], e["message"], e.get("param")))
        return envelope["result"]

    # judge

    async def _judge(self, body: JudgeRequest) -> dict:
        self._check_judge_limits(body)
        name = self.served_model(body.model)
        [answer] = await self.call_engine("judge", name, [judge_item(body)])
        return {**answer, "model": self.name_of(name)}

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

    # moderations

    async def _moderate(self, body: ModerationRequest) -> dict:
        """OpenAI's moderation shape: each input judged as a text; flagged = tier unsafe, and tier uncertain too
        under serve.moderation_flag_uncertain (the default: what SafeConf cannot vouch for is flagged)."""
        limits = self.config.serve
        texts = body.texts()
        if len(texts) > limits.max_moderation_inputs:
            raise ApiError(422, f"input: at most {limits.max_moderation_inputs} texts, got {len(texts)}", "input")
        for i, text in enumerate(texts):
            if len(text) > limits.max_text_chars:
                raise ApiError(422, f"input.{i}: longer than {limits.max_text_chars} characters", f"input.{i}")
        name = self.served_model(body.model)
        answers = await self.call_engine("judge", name, [text_item(None, "text", text) for text in texts])
        results = []
        for answer in answers:
            flagged = answer["tier"] == "unsafe" or (answer["tier"] == "uncertain" and limits.moderation_flag_uncertain)
            score = UNREADABLE_P_UNSAFE if answer["p_unsafe"] is None else answer["p_unsafe"]
            results.append({
                "flagged": flagged, "categories": {MODERATION_CATEGORY: flagged},
                "category_scores": {MODERATION_CATEGORY: score},
                "category_applied_input_types": {MODERATION_CATEGORY: ["text"]},
                "p_unsafe": answer["p_unsafe"], "tier": answer["tier"], "confidence": answer["confidence"],
                "decided_by": answer["decided_by"], "escalation_error": answer.get("escalation_error"),
            })
        response = ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=self.name_of(name), results=results)
        return response.model_dump()

    # chat

    async def _chat(self, body: ChatRequest) -> dict:
        request = self._chat_item(body)
        name = self.served_model(body.model)
        answer = await self.call_engine("chat", name, request)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name_of(name), **answer}

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


async def _awaited(response):
    return await response


def _cancel(response) -> None:
    """Best effort: drop a request still queued for a replica (or running on one) whose answer nobody awaits."""
    if response is None:
        return
    try:
        response.cancel()
    except Exception:  # already finished or cancelled
        pass
