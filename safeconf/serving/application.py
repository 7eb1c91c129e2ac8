"""The SafeConf Serve application: its two deployments (the front, safeconf.serving.app.JudgeFront, and the engine
replicas, safeconf.serving.deployment.JudgeServer), their options from the config, and how it is built (build_app)
and run (run_serve)."""

from __future__ import annotations

import hashlib
import logging
import os
import time

from ray import serve

from safeconf.config import Config, config_from_dict
from safeconf.engines.base import engine_runtime_env, placement_bundles
from safeconf.serving.app import JudgeFront, api
from safeconf.serving.deployment import FRONT_NUM_CPUS, MODELS_PER_REPLICA_ENV, JudgeServer
from safeconf.serving.escalation import EscalationTarget
from safeconf.serving.judging import adapter_config, resolve_policy

log = logging.getLogger("ray.serve")

JudgeDeployment = serve.deployment(name="SafeConfJudge")(JudgeServer)
FrontDeployment = serve.deployment(name="SafeConfFront")(serve.ingress(api)(JudgeFront))


def deployment_options(config: Config) -> dict:
    """Serve options of the deployment, from the config (plain data: checked in tests without a cluster)."""
    serve_cfg, engine = config.serve, config.engine
    actor = {"num_cpus": engine.num_cpus, "runtime_env": engine_runtime_env(engine)}
    actor["runtime_env"]["env_vars"][MODELS_PER_REPLICA_ENV] = str(serve_cfg.max_models_per_replica)
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
        # queued at each front replica's handle; beyond it the front answers 503 + Retry-After (BackPressureError)
        "max_queued_requests": serve_cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": serve_cfg.retry_after_s},
        "ray_actor_options": actor,
    }
    bundles = placement_bundles(engine)
    if bundles:  # the replica coordinates vLLM's own per-GPU workers in one placement group
        options["placement_group_bundles"] = bundles
    else:
        actor["num_gpus"] = engine.num_gpus
    return options


def front_options(config: Config) -> dict:
    """Serve options of the front (the ingress): a small CPU share and no model. It holds every request the
    engine replicas hold or queue, so its own limit is above theirs and the engine's queue bound (a JSON 503)
    comes first; as many replicas as the engine's fewest, so a dead front is not the only one. Its user_config
    (request_timeout_s, retry_after_s) changes without a restart."""
    serve_cfg = config.serve
    queued = serve_cfg.max_queued_requests if serve_cfg.max_queued_requests >= 0 else 1024
    return {
        "num_replicas": serve_cfg.min_replicas,
        "max_ongoing_requests": serve_cfg.max_replicas * serve_cfg.max_ongoing_requests + queued + 64,
        "max_queued_requests": serve_cfg.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": serve_cfg.retry_after_s},
        "ray_actor_options": {"num_cpus": FRONT_NUM_CPUS},
        "user_config": {"request_timeout_s": serve_cfg.request_timeout_s, "retry_after_s": serve_cfg.retry_after_s},
    }


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
    """The Serve application of the config (`serve.run(build_app(config))`): the front (ingress) bound to the
    engine deployment, which it calls through a DeploymentHandle."""
    config.validate()  # the serve section's rules included
    config = _with_absolute_paths(config)
    target = EscalationTarget.of(config.serve)
    adapters = {entry["name"]: resolve_policy(adapter_config(config, entry)).user_config()
                for entry in config.serve.adapters}  # each judged as its own evaluation calibrated it
    user_config = {**resolve_policy(config).user_config(), "request_timeout_s": config.serve.request_timeout_s,
                   "escalation": target.to_dict() if target else None, "adapters": adapters}
    options = deployment_options(config)
    if target and target.api_key():  # replicas read the key from their environment: hand it to them
        env = options["ray_actor_options"].setdefault("runtime_env", {}).setdefault("env_vars", {})
        env[target.key_env] = target.api_key()
    engine = JudgeDeployment.options(user_config=user_config, **options).bind(config.to_dict())
    return FrontDeployment.options(**front_options(config)).bind(engine, config.to_dict(), auth_token_digest(config))


def _with_absolute_paths(config: Config) -> Config:
    """A copy whose local relative model / adapter paths are absolute: replicas do not run in this directory."""
    config = config_from_dict(config.to_dict())
    places = [(config.model, "name"), (config.model, "adapter")] + [(entry, key) for entry in config.serve.adapters
                                                                    for key in ("adapter", "metrics_path")]
    for place, key in places:
        value = place.get(key) if isinstance(place, dict) else getattr(place, key)
        if value and value != "embedded" and "://" not in value and os.path.exists(value):
            if isinstance(place, dict):
                place[key] = os.path.abspath(value)
            else:
                setattr(place, key, os.path.abspath(value))
    return config


def run_serve(config: Config, port: int | None = None, blocking: bool = True) -> str:
    """Start Serve (on config.ray_address, or a local Ray) with the SafeConf application; returns its URL.

    blocking=True keeps this process (and a local Ray it started) alive until Ctrl-C, then deletes the app.
    """
    from safeconf.ray_utils import init_ray

    init_ray(config.ray_address)
    port = port or config.serve.port
    serve.start(proxy_location=config.serve.proxy_location, http_options={"host": config.serve.host, "port": port})
    serve.run(build_app(config), name=config.serve.app_name, route_prefix=config.serve.route_prefix)
    url = f"http://{config.serve.host}:{port}{config.serve.route_prefix.rstrip('/')}"
    log.info("SafeConf endpoint at %s (POST /v1/judge, POST /v1/moderations, POST /v1/chat/completions, "
             "GET /healthz)", url)
    if not blocking:
        return url
    print(f"SafeConf endpoint at {url}; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(config.serve.app_name)
    return url
