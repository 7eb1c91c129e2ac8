"""HTTP: the FastAPI app of the deployment, its guard middleware (auth and body size before the body is read),
the JSON error handlers, and the replica's Prometheus metrics. Middleware and handlers are registered here,
before @serve.ingress (in safeconf.serving.deployment) freezes the app; the routes are the deployment's methods.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from safeconf.serving.schemas import error_response

log = logging.getLogger("ray.serve")

HEALTH_PATH = "/healthz"
ROUTES = ("/v1/judge", "/v1/moderations", "/v1/chat/completions", "/v1/models", HEALTH_PATH)

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
                                  "defer), confidence source, tier and who decided (safeconf / escalated).",
                                  tag_keys=("method", "decision", "confidence_source", "tier", "decided_by"))

    def count(self, path: str, status: int, seconds: float | None = None):
        self.requests.inc(tags={"path": path, "status": str(status)})
        if seconds is not None:
            self.latency.observe(seconds, tags={"path": path})
