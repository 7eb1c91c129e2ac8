"""Engine calls that find no replica able to answer: which failures those are, and their answer (503 with
Retry-After, in the API's error shape); any other failure is a 500 without internals."""

from __future__ import annotations

import logging
import math

from fastapi.responses import JSONResponse

from safeconf.serving.schemas import error_response

log = logging.getLogger("ray.serve")


def unavailable_errors() -> tuple[type, ...]:
    """What a DeploymentHandle call raises when no engine replica can answer (read from Ray 2.60's router and
    replica_result): the replica died holding the request (ActorDiedError, also inside a RayTaskError), is
    unreachable or restarting (ActorUnavailableError; RayActorError covers both), the caller's queue of
    max_queued_requests is full (BackPressureError), the deployment failed to deploy (DeploymentUnavailableError),
    or the chosen replica is gone (ReplicaUnavailableError)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return (ActorDiedError, ActorUnavailableError, RayActorError, BackPressureError, DeploymentUnavailableError,
            ReplicaUnavailableError)


def is_unavailable(error: BaseException) -> bool:
    from ray.exceptions import RayTaskError

    found = unavailable_errors()
    if isinstance(error, found):
        return True
    # a RayTaskError wrapping one of them (Ray makes it an instance of its cause, but not for every cause)
    return isinstance(error, RayTaskError) and isinstance(getattr(error, "cause", None), found)


def unavailable_response(message: str, retry_after_s: float) -> JSONResponse:
    response = error_response(503, "service_unavailable", message)
    response.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))  # RFC 9110: whole seconds
    return response


def failure_response(error: BaseException, retry_after_s: float) -> JSONResponse:
    """The answer to a failed engine call: 503 + Retry-After when no replica could answer, else 500; never the
    trace (that goes to the log)."""
    if is_unavailable(error):
        log.warning("engine unavailable: %s: %s", type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return unavailable_response("the judge is restarting or busy; retry after the Retry-After seconds",
                                    retry_after_s)
    log.error("engine call failed", exc_info=error)
    return error_response(500, "internal_error", "internal error; see the server log")


class Unanswered(Exception):
    """The engine gave no answer: the response to send instead."""

    def __init__(self, response: JSONResponse):
        super().__init__(response.status_code)
        self.response = response


def running_replicas(deployment: str) -> int:
    """RUNNING replicas of a deployment of this replica's application, from Serve's controller."""
    from ray import serve

    app = serve.get_replica_context().app_name
    found = serve.status().applications[app].deployments[deployment]
    return found.replica_states.get("RUNNING", 0)
