"""The Ray Serve endpoint: calibrated safety judgements over HTTP, and an OpenAI-compatible chat route.

Routes (JSON in, JSON out; errors are `{"error": {"type", "message", "param"}}`, the shape OpenAI clients read):
- `POST /v1/judge`: a multiple-choice question (`question` + `options`), or content to judge: `text` alone
  (is this text safe?), `prompt` alone (is it safe to comply with this request?), or both (is this response to
  the prompt safe?). Answer: the option, the model's confidence in it, and `accept` / `defer` against the
  threshold (serve.threshold, or the one `safeconf evaluate` calibrated, read from its metrics.json); in the
  guard-model language, `label` (safe / unsafe), the calibrated `p_unsafe`, the `tier` (safe, unsafe, or
  uncertain when the threshold defers), and the threshold's `guarantee` (alpha, delta, calibration_size);
  `decided_by` (safeconf, or escalated: see below).
- `POST /v1/moderations`: OpenAI's moderation API (`input`: a text or a list; `results` with `flagged`,
  `categories` and `category_scores` over the one category SafeConf judges, `unsafe`), plus p_unsafe, tier and
  confidence per text. flagged = tier unsafe, and tier uncertain as well unless
  serve.moderation_flag_uncertain=false.
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

Escalation (serve.escalate_url, an OpenAI-compatible chat endpoint of a stronger judge): deferred judgements go
there with a bounded timeout and retries (safeconf.serving.escalation); its verdict sets label and tier
(`decided_by: "escalated"`, its answer under `escalation`). A target that is down, slow or garbled never fails a
request: SafeConf's answer comes back with tier uncertain and `escalation_error`.

Several adapters (serve.adapters, each with its own calibration) on one endpoint: a request's `model` picks one;
each replica keeps at most serve.max_models_per_replica loaded (Serve model multiplexing, least recently used
dropped).

Two deployments: a light front (SafeConfFront, the ingress: routes, auth, validation, limits, HTTP metrics; no
model, a small CPU share) and the engine (SafeConfJudge: one model copy per replica), which the front calls
through a DeploymentHandle, with the request's `model` as Serve's multiplexed model id.

Under load: on vLLM the replica runs its async engine, and every request's prompts join the batch it is running
(continuous batching); on the hf engine requests of a route are batched (`@serve.batch`, one engine call per
batch) on one engine thread (serve.replica_engine). Engine replicas autoscale, each front replica queues at most
serve.max_queued_requests for them (then 503 at once), and a request without an answer after
serve.request_timeout_s gets 504. The replica's event loop keeps answering while the model works.

Bad input never reaches the model: the bearer token (when set) and the body size are checked before the body
is read (401 / 413), the body is validated by pydantic models in strict mode (422 naming the field), and the
configured limits apply (422), all in the front. Anything unexpected gives a 500 without internals; the replica
logs it and keeps serving. An engine replica that dies (out of memory, a killed process) is replaced by Serve's
controller; the requests it held, and those that find no replica up within serve.request_timeout_s, get 503
with `Retry-After: serve.retry_after_s` in the error shape (never a hang, never a bare 500), and new requests
go to live replicas.

The package: `schemas` (request and response bodies, errors), `judging` (JudgeItem, judge_batch, decisions,
tiers, the policy and its threshold), `escalation`, `app` (the front: the FastAPI app, routes, middleware,
metrics, the 503 mapping), `deployment` (the engine replica), `application` (the two deployments' options,
build_app, run_serve).

Run it: `safeconf serve`, `run_serve(config, port)`, `serve run safeconf.serving:app` (config from the YAML
named by $SAFECONF_CONFIG), or `serve run safeconf.serving:app_builder config=FILE key=value ...` (also the
`import_path` + `args` of a KubeRay RayService).
"""

from __future__ import annotations

import os

from safeconf.config import load_config
from safeconf.serving.app import JudgeFront
from safeconf.serving.unavailable import failure_response, is_unavailable
from safeconf.serving.application import (
    FrontDeployment,
    JudgeDeployment,
    build_app,
    deployment_options,
    front_options,
    run_serve,
)
from safeconf.serving.deployment import JudgeServer, chat_batch
from safeconf.serving.escalation import EscalationError, EscalationTarget, escalate
from safeconf.serving.judging import (
    JudgeItem,
    JudgePolicy,
    decide,
    judge_batch,
    judge_item,
    resolve_policy,
    text_item,
    with_decision,
)
from safeconf.serving.schemas import ChatRequest, JudgeRequest, ModerationRequest, ModerationResponse


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


__all__ = ["JudgeRequest", "ChatRequest", "ModerationRequest", "ModerationResponse", "build_app", "app_builder",
           "run_serve", "judge_batch", "judge_item", "text_item", "decide", "with_decision", "resolve_policy",
           "JudgePolicy", "JudgeItem", "deployment_options", "front_options", "JudgeDeployment", "JudgeServer",
           "FrontDeployment", "JudgeFront", "failure_response", "is_unavailable", "chat_batch",
           "EscalationTarget", "EscalationError", "escalate"]
