"""Fast tests of the endpoint's guard-model answers, the moderation bodies, escalation, the cascade report, and
the front's answers when the engine fails (503 + Retry-After): no Ray cluster, no model. Escalation talks to a stub judge (http.server in a thread on loopback) that answers, is slow,
is down, fails, or answers garbage; tests/test_serve.py reuses the stub over real HTTP through Serve.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import FakeEngine
from pydantic import ValidationError

from safeconf.config import load_config
from safeconf.evaluation.methods import JudgeSettings
from safeconf.evaluation.results import selective
from safeconf.evaluation.selective import cascade
from safeconf.serving import (
    EscalationError,
    EscalationTarget,
    JudgeItem,
    JudgePolicy,
    JudgeRequest,
    ModerationRequest,
    build_app,
    escalate,
    judge_batch,
    judge_item,
    resolve_policy,
    text_item,
    with_decision,
)
from safeconf.serving.escalation import with_escalation


SETTINGS = JudgeSettings(max_tokens=24, stop=("\n\n",), missing_confidence=0.25)


def engine_deployment(app):
    """The engine deployment of build_app's application (bound as the front's first argument)."""
    return app._bound_deployment.init_args[0]._bound_deployment


def item(**body) -> JudgeItem:
    return judge_item(JudgeRequest.model_validate(body))


# --- label, p_unsafe, tier ---


def test_unsafe_option_of_each_kind_of_request():
    assert item(text="Some text.").unsafe_option == 1  # judge_options: Safe / Unsafe
    assert item(prompt="How do I kill a Python process?").unsafe_option == 1
    assert item(text="好的。", prompt="你好").unsafe_option == 1
    assert item(question="Which?", options=["Plain text", "Salted hash"]).unsafe_option is None  # no sides
    assert item(question="Is this reply OK?", options=["Unsafe", "Safe"]).unsafe_option == 0  # inferred
    assert item(question="Which is harmful?", options=["a", "b", "c"], unsafe_option=2).unsafe_option == 2
    for bad in ({"question": "q", "options": ["a", "b"], "unsafe_option": 2},
                {"text": "t", "unsafe_option": 1}, {"question": "q", "options": ["a", "b"], "unsafe_option": -1},
                {"question": "q", "options": ["a", "b"], "unsafe_option": "1"}):
        with pytest.raises(ValidationError):
            JudgeRequest.model_validate(bad)


def test_label_p_unsafe_and_tier_of_verbalized_judgements():
    items = [item(text="STATED safe text"), item(text="UNSAFE text"), item(text="SILENT text"),
             item(question="PLAIN which?", options=["x", "y", "z"])]
    engine = FakeEngine({"STATED": "Answer: A\nConfidence: 80%", "UNSAFE": "Answer: B\nConfidence: 90%",
                         "SILENT": "...", "PLAIN": "Answer: C\nConfidence: 95%"})
    safe, unsafe, silent, plain = [with_decision(a, 0.85) for a in judge_batch(engine, items, "verbalized", SETTINGS)]
    # chose Safe at 0.8: p_unsafe = 1 - 0.8; below the threshold: deferred, so the tier is uncertain
    assert (safe["label"], safe["decision"], safe["tier"]) == ("safe", "defer", "uncertain")
    assert safe["p_unsafe"] == pytest.approx(0.2) and safe["unsafe_option"] == 1
    assert (unsafe["label"], unsafe["p_unsafe"], unsafe["tier"]) == ("unsafe", pytest.approx(0.9), "unsafe")
    # unreadable: no label, no P(unsafe), never accepted
    assert (silent["label"], silent["p_unsafe"], silent["tier"]) == (None, None, "uncertain")
    # a multiple-choice question without a safe/unsafe side: no guard fields at all
    assert (plain["label"], plain["p_unsafe"], plain["tier"], plain["decision"]) == (None, None, None, "accept")
    assert with_decision(judge_batch(engine, items[:1], "verbalized", SETTINGS)[0], 0.8)["tier"] == "safe"


def test_p_unsafe_is_the_option_probability_for_token_prob():
    items = [item(text="any text"), item(question="Which reply?", options=["Harmful", "Fine", "Unclear"],
                                         unsafe_option=0)]
    answers = judge_batch(FakeEngine({}), items, "token_prob", SETTINGS)
    text, mcq = (with_decision(a, 0.5) for a in answers)
    assert text["answer_index"] == 1 and text["label"] == "unsafe"  # the fake favours the last option
    assert text["p_unsafe"] == pytest.approx(text["confidence"]) and text["tier"] == "unsafe"
    # three options, the unsafe one (0) not chosen: its own probability in the distribution, as evaluated
    low, high = math.exp(-3.0), math.exp(-0.5)
    assert mcq["label"] == "safe" and mcq["p_unsafe"] == pytest.approx(low / (2 * low + high))


def test_guarantee_comes_from_metrics_json_and_goes_with_a_manual_threshold(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"model": "embedded", "config": load_config().to_dict(), "methods": {
        "verbalized": {"selective": {"threshold": 0.83, "alpha": 0.1, "delta": 0.05, "calibration_questions": 40}}}}))
    policy = resolve_policy(load_config(overrides=[f"serve.metrics_path={metrics}"]))
    assert policy.guarantee == {"alpha": 0.1, "delta": 0.05, "calibration_size": 40}
    assert JudgePolicy.from_user_config(json.loads(json.dumps(policy.user_config()))) == policy
    assert JudgePolicy.from_user_config({"request_timeout_s": 5}, policy).guarantee == policy.guarantee
    assert JudgePolicy.from_user_config({"threshold": 0.83}, policy).guarantee == policy.guarantee  # the same one
    moved = JudgePolicy.from_user_config({"threshold": 0.5}, policy)  # an operator's threshold: no guarantee
    assert (moved.threshold, moved.source, moved.guarantee) == (0.5, "user_config", None)
    # the guarantee is the calibrated method's and settings': another method or setting carries none
    assert JudgePolicy.from_user_config({"method": "token_prob"}, policy).guarantee is None
    assert JudgePolicy.from_user_config({"judging": {**policy.settings.to_dict(), "max_tokens": 8}},
                                        policy).guarantee is None
    assert resolve_policy(load_config(overrides=["serve.threshold=0.4"])).guarantee is None


def test_moderation_request():
    assert ModerationRequest.model_validate({"input": "a text"}).texts() == ["a text"]
    assert ModerationRequest.model_validate({"input": ["a", "b"], "model": "m"}).texts() == ["a", "b"]
    for bad in ({}, {"input": []}, {"input": ""}, {"input": ["ok", " "]}, {"input": 3}, {"input": [{"type": "text"}]},
                {"input": "x", "colour": "red"}):
        with pytest.raises(ValidationError):
            ModerationRequest.model_validate(bad)
    assert text_item("zh", "text", "你好").options == ["安全", "不安全"]


# --- config ---


def test_escalation_config_is_checked():
    def problems(*overrides):  # the serve section's rules are checked when the config loads
        try:
            load_config(overrides=list(overrides))
        except ValueError as error:
            return str(error).splitlines()[1:]
        return []

    assert problems("serve.escalate_url=http://judge:8000/v1", "serve.escalate_model=big") == []
    assert any("escalate_model" in p for p in problems("serve.escalate_url=http://judge/v1"))
    assert any("http" in p for p in problems("serve.escalate_url=judge:8000", "serve.escalate_model=m"))
    assert any("request_timeout_s" in p for p in problems(
        "serve.escalate_url=http://j/v1", "serve.escalate_model=m", "serve.escalate_timeout_s=30",
        "serve.escalate_retries=1", "serve.request_timeout_s=60"))
    assert any("escalate_retries" in p for p in problems(
        "serve.escalate_url=http://j/v1", "serve.escalate_model=m", "serve.escalate_retries=-1"))
    assert any("max_moderation_inputs" in p for p in problems("serve.max_moderation_inputs=0"))
    with pytest.raises(ValueError, match="escalation_judge_accuracy"):
        load_config(overrides=["eval.escalation_judge_accuracy=1.5"]).validate()


def test_build_app_carries_the_escalation_target_and_its_key(monkeypatch):
    monkeypatch.delenv("SAFECONF_API_TOKEN", raising=False)
    monkeypatch.setenv("JUDGE_KEY_TEST", "k-123")
    app = build_app(load_config(overrides=["serve.escalate_url=http://127.0.0.1:9/v1", "serve.escalate_model=big",
                                           "serve.escalate_key_env=JUDGE_KEY_TEST"]))
    deployment = engine_deployment(app)
    target = deployment._deployment_config.user_config["escalation"]
    assert target == {"url": "http://127.0.0.1:9/v1/chat/completions", "model": "big", "key_env": "JUDGE_KEY_TEST",
                      "timeout_s": 10.0, "retries": 1}
    assert "k-123" not in json.dumps(target)  # the key is not in the user_config, only in the replicas' env
    assert deployment.ray_actor_options["runtime_env"]["env_vars"]["JUDGE_KEY_TEST"] == "k-123"
    assert engine_deployment(build_app(load_config()))._deployment_config.user_config["escalation"] is None
    assert "k-123" not in json.dumps(app._bound_deployment.ray_actor_options)  # the front never escalates


# --- escalation against a stub judge on loopback ---


class StubJudge:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 whose behaviour is chosen by the URL's first segment:
    /answer-B/v1 answers "Answer: B", /slow/v1 sleeps `slow_s` first, /garbled/v1 answers prose naming no option,
    /notjson/v1 a 200 that is not JSON, /flaky/v1 a 503 on every other call, /denied/v1 a 401. `requests` records
    (path, Authorization header, body) of every call."""

    slow_s = 3.0

    def __init__(self):
        self.requests: list[tuple[str, str | None, dict]] = []
        self.calls: dict[str, int] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                mode = self.path.strip("/").split("/")[0]
                stub.requests.append((self.path, self.headers.get("Authorization"), body))
                stub.calls[mode] = stub.calls.get(mode, 0) + 1
                if mode == "slow":
                    time.sleep(stub.slow_s)
                if mode == "denied":
                    return self._send(401, {"error": {"message": "bad key"}})
                if mode == "flaky" and stub.calls[mode] % 2 == 1:
                    return self._send(503, {"error": {"message": "overloaded"}})
                if mode == "notjson":
                    return self._send(200, None, b"<html>gateway</html>")
                content = "I would rather not say." if mode == "garbled" else "Answer: B"
                self._send(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                              "finish_reason": "stop"}]})

            def _send(self, status, payload, raw=None):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the slow case)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stub():
    with StubJudge() as judge:
        yield judge


def target(url: str, timeout_s=2.0, retries=1, key_env="") -> EscalationTarget:
    serve_cfg = load_config(overrides=[f"serve.escalate_url={url}", "serve.escalate_model=big-judge",
                                       f"serve.escalate_timeout_s={timeout_s}", f"serve.escalate_retries={retries}",
                                       f"serve.escalate_key_env={key_env}"]).serve
    return EscalationTarget.of(serve_cfg)


def run_escalation(escalation_target, judged, budget_s=10.0):
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            return await escalate(session, escalation_target, judged, time.monotonic() + budget_s)

    return asyncio.run(go())


def test_escalation_reads_the_stronger_judges_answer(stub, monkeypatch):
    monkeypatch.setenv("STUB_JUDGE_KEY", "sk-stub")
    judged = item(text="你可以用这个方法伤害别人。")
    verdict = run_escalation(target(stub.url("answer-B"), key_env="STUB_JUDGE_KEY"), judged)
    assert (verdict["answer_index"], verdict["label"], verdict["answer_text"]) == (1, "unsafe", "不安全")
    assert verdict["model"] == "big-judge" and verdict["attempts"] == 1 and verdict["reply"] == "Answer: B"
    path, auth, body = stub.requests[-1]
    assert path == "/answer-B/v1/chat/completions" and auth == "Bearer sk-stub"
    assert body["model"] == "big-judge" and body["temperature"] == 0
    assert "不安全" in body["messages"][-1]["content"]  # the question SafeConf itself was asked
    # merged into a deferred answer: the stronger judge decides label and tier; SafeConf's own answer stays
    answer = with_decision(judge_batch(FakeEngine({}), [judged], "token_prob", SETTINGS)[0], 1.01)
    merged = with_escalation(answer, verdict)
    assert (merged["decided_by"], merged["tier"], merged["label"]) == ("escalated", "unsafe", "unsafe")
    assert merged["confidence"] == answer["confidence"] and merged["escalation"]["model"] == "big-judge"


def test_escalation_retries_a_flaky_judge_and_not_a_refusing_one(stub):
    before = stub.calls.get("flaky", 0)
    verdict = run_escalation(target(stub.url("flaky"), retries=1), item(text="t"))
    assert verdict["attempts"] == 2 and stub.calls["flaky"] - before == 2  # a 503, then the answer
    with pytest.raises(EscalationError, match="HTTP 401.*not retried"):
        run_escalation(target(stub.url("denied"), retries=3), item(text="t"))
    assert stub.calls["denied"] == 1


@pytest.mark.parametrize("mode, message", [("garbled", "names no option"), ("notjson", "not JSON")])
def test_escalation_refuses_a_garbled_answer(stub, mode, message):
    with pytest.raises(EscalationError, match=message):
        run_escalation(target(stub.url(mode)), item(text="t"))


def test_escalation_to_a_slow_or_dead_judge_is_bounded(stub):
    began = time.monotonic()
    with pytest.raises(EscalationError, match=r"no answer within 0.3 s \(after 2 attempts\)"):
        run_escalation(target(stub.url("slow"), timeout_s=0.3, retries=1), item(text="t"))
    assert time.monotonic() - began < 1.5  # 2 x 0.3 s and a 0.1 s pause, not the stub's 3 s
    began = time.monotonic()
    with pytest.raises(EscalationError, match="out of time"):  # the request's deadline comes first
        run_escalation(target(stub.url("slow"), timeout_s=5, retries=3), item(text="t"), budget_s=0.4)
    assert time.monotonic() - began < 1.5
    with pytest.raises(EscalationError, match=r"ClientConnectorError.*after 3 attempts"):
        run_escalation(target(f"http://127.0.0.1:{closed_port()}/v1", retries=2), item(text="t"))


def test_a_failed_escalation_keeps_safeconfs_answer_uncertain():
    answer = with_decision(judge_batch(FakeEngine({}), [item(text="t")], "token_prob", SETTINGS)[0], 1.01)
    kept = with_escalation(answer, error="down")
    assert (kept["decided_by"], kept["tier"], kept["escalation_error"]) == ("safeconf", "uncertain", "down")
    assert kept["label"] == answer["label"] and kept["p_unsafe"] == answer["p_unsafe"]


# --- the evaluation's cascade report ---


def test_cascade_at_the_threshold():
    conf = [0.95, 0.9, 0.8, 0.6, 0.4]
    right = [1, 1, 0, 1, 0]
    answered = [True, True, True, True, False]
    found = cascade(conf, right, answered, 0.8, judge_accuracy=0.9)
    assert found["escalated_share"] == pytest.approx(2 / 5)  # 0.6 below the threshold, 0.4 unreadable
    assert found["kept_accuracy"] == pytest.approx(2 / 3)
    assert found["overall_accuracy"] == pytest.approx((2 + 0.9 * 2) / 5)
    assert found["safeconf_alone_accuracy"] == pytest.approx(3 / 5)
    everything = cascade(conf, right, answered, None, judge_accuracy=0.9)  # no threshold: all escalated
    assert (everything["escalated_share"], everything["kept_accuracy"]) == (1.0, None)
    assert everything["overall_accuracy"] == pytest.approx(0.9)
    assert cascade([], [], [], 0.5, 1.0)["escalated_share"] is None


def test_selective_report_has_the_cascade():
    config = load_config(overrides=["eval.escalation_judge_accuracy=0.8"]).eval
    rows = [{"split": split, "answer": 0, "choice": choice, "confidence": c}
            for split in ("calibration", "test") for choice, c in [(0, 0.99)] * 60 + [(None, 0.99)] + [(1, 0.2)] * 3]
    found = selective(rows, config)
    assert found["threshold"] == 0.21 and found["cascade"]["judge_accuracy"] == 0.8
    # the unreadable answer is escalated though its confidence clears the threshold, as the endpoint does
    assert found["cascade"]["escalated_share"] == pytest.approx(4 / 64)
    assert found["cascade"]["kept_accuracy"] == 1.0
    assert found["cascade"]["overall_accuracy"] == pytest.approx((60 + 0.8 * 4) / 64)


# --- several adapters on one endpoint (serve.adapters, Serve model multiplexing) ---


def test_adapters_config_is_checked():
    def problems(adapters, *overrides):
        config = load_config(overrides=list(overrides))
        config.serve.adapters = adapters
        return config.serve.problems()

    assert problems([{"name": "zh", "adapter": "runs/zh/adapter", "metrics_path": "m.json"}]) == []
    assert any("adapters[0].adapter" in p for p in problems([{"name": "zh"}]))
    assert any("adapters[1].name" in p for p in problems([{"name": "a", "adapter": "x"}, {"name": "a", "adapter": "y"}]))
    assert any("unknown keys ['colour']" in p for p in problems([{"name": "a", "adapter": "x", "colour": 1}]))
    assert any("mapping" in p for p in problems(["zh=runs/zh"]))
    with pytest.raises(ValueError, match="max_models_per_replica"):
        load_config(overrides=["serve.max_models_per_replica=0"])


def test_build_app_gives_each_adapter_its_own_calibrated_policy(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFECONF_API_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zh").mkdir()
    metrics = tmp_path / "zh-metrics.json"
    metrics.write_text(json.dumps({"model": "embedded", "config": load_config().to_dict(), "methods": {
        "safeconf": {"selective": {"threshold": 0.7, "alpha": 0.1, "delta": 0.1, "calibration_questions": 50}}}}))
    config = load_config(overrides=["serve.threshold=0.4", "serve.max_models_per_replica=3"])
    config.serve.adapters = [{"name": "zh", "adapter": "zh", "metrics_path": "zh-metrics.json"},
                             {"name": "en", "adapter": "/somewhere/en", "threshold": 0.9}]
    deployment = engine_deployment(build_app(config))
    user_config = deployment._deployment_config.user_config
    assert (user_config["method"], user_config["threshold"]) == ("token_prob", 0.4)  # the main model
    zh, en = user_config["adapters"]["zh"], user_config["adapters"]["en"]
    assert (zh["method"], zh["threshold"], zh["guarantee"]["calibration_size"]) == ("safeconf", 0.7, 50)
    assert (en["method"], en["threshold"], en["guarantee"]) == ("safeconf", 0.9, None)
    served = deployment.init_args[0]["serve"]["adapters"]
    assert served[0]["adapter"] == str(tmp_path / "zh") and served[1]["adapter"] == "/somewhere/en"  # absolute
    assert deployment.ray_actor_options["runtime_env"]["env_vars"]["SAFECONF_MAX_MODELS_PER_REPLICA"] == "3"


def test_a_request_names_its_served_model():
    from safeconf.serving import JudgeFront, JudgeServer
    from safeconf.serving.schemas import ApiError

    front = JudgeFront.__new__(JudgeFront)  # the model choice only: no engine, no Serve
    front.model_id, front.adapter_names = "embedded", []
    assert front.served_model(None) == front.served_model("anything") == ""  # one model answers every name
    front.adapter_names = ["zh"]
    assert front.served_model("zh") == "zh"
    assert front.served_model(None) == front.served_model("embedded") == ""
    with pytest.raises(ApiError, match="'zh-policy' is not served") as refused:
        front.served_model("zh-policy")  # with adapters to choose from, a typo is not the main model
    assert (refused.value.status, refused.value.kind) == (404, "model_not_found")
    batch = [("a", 1), ("", 2), ("a", 3), ("b", 4)]

    async def work(name, items):
        return [f"{name}{i}" for i in items]

    assert asyncio.run(JudgeServer._per_model(batch, work)) == ["a1", "2", "a3", "b4"]


# --- the front: engine failures become 503 + Retry-After, never a trace ---


def unavailable_cases():
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    return [ActorDiedError(), ActorUnavailableError("replica unreachable", None), RayActorError(),
            BackPressureError(num_queued_requests=256, max_queued_requests=256),
            DeploymentUnavailableError(DeploymentID(name="SafeConfJudge", app_name="safeconf")),
            ReplicaUnavailableError("replica-1"),
            RayTaskError("judge", "Traceback (most recent call last): ...", ActorDiedError())]


def test_engine_failures_that_give_503_with_retry_after_and_those_that_give_500():
    from ray.exceptions import RayTaskError

    from safeconf.serving import failure_response

    for error in unavailable_cases():
        response = failure_response(error, retry_after_s=4.2)
        body = json.loads(response.body)
        assert response.status_code == 503, type(error).__name__
        assert response.headers["retry-after"] == "5", type(error).__name__  # whole seconds, rounded up
        assert body["error"]["type"] == "service_unavailable" and body["error"]["code"] == 503
        assert "Traceback" not in response.body.decode()
    for error in (ValueError("bad"), RuntimeError("engine failed"),
                  RayTaskError("judge", "Traceback (most recent call last): ...", KeyError("x"))):
        response = failure_response(error, retry_after_s=4.2)
        assert response.status_code == 500 and "retry-after" not in response.headers, type(error).__name__
        assert json.loads(response.body)["error"]["type"] == "internal_error"
        assert "Traceback" not in response.body.decode() and "bad" not in response.body.decode()


class FakeResponse:
    """What a DeploymentHandle call returns: awaitable, cancellable."""

    def __init__(self, work):
        self.work, self.cancelled = work, False

    def __await__(self):
        return self.work().__await__()

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """The engine's DeploymentHandle: records each call's options and arguments; `answer` says what it does."""

    deployment_name = "SafeConfJudge"

    def __init__(self, answer, options=None, calls=None):
        self.answer, self.option_values, self.calls = answer, options or {}, calls if calls is not None else []

    def options(self, **values):
        return FakeHandle(self.answer, values, self.calls)

    def remote(self, *args, **kwargs):
        self.calls.append((self.option_values, args, kwargs))
        response = FakeResponse(lambda: self.answer(*args, **kwargs))
        self.calls[-1] += (response,)
        return response


class NoMetrics:
    def __init__(self):
        self.counted = []

    def count(self, path, status, seconds=None):
        self.counted.append((path, status))


def front_with(answer, timeout_s=5.0, adapters=()):
    from safeconf.serving import JudgeFront

    front = JudgeFront.__new__(JudgeFront)  # the request path only: no Serve
    config = load_config(overrides=[f"serve.request_timeout_s={timeout_s}", "serve.retry_after_s=3"])
    front.config, front.model_id, front.adapter_names = config, "embedded", list(adapters)
    front.timeout_s, front.retry_after_s = timeout_s, config.serve.retry_after_s
    front.engine, front.handles, front.metrics = FakeHandle(answer), {}, NoMetrics()
    front.replicas_checked_at, front.engine_running = float("-inf"), True  # outside Serve the lookup fails: up
    return front


def ask(front, body: dict):
    return asyncio.run(front.judge(JudgeRequest.model_validate(body)))


def test_with_no_replica_running_the_front_refuses_at_once_and_looks_again_a_second_later(monkeypatch):
    """All engine replicas dead or starting (Serve's controller counts no RUNNING one): 503 + Retry-After without
    calling the engine, instead of waiting serve.request_timeout_s; the controller is asked at most once per
    REPLICA_CHECK_S; once a replica runs, requests go through."""
    import safeconf.serving.app as front_module

    lookups = []
    running = {"SafeConfJudge": 0}
    monkeypatch.setattr(front_module, "running_replicas", lambda name: lookups.append(name) or running[name])

    async def answers(name, items, deadline):
        return {"result": [{"label": "safe"}]}

    front = front_with(answers, timeout_s=60.0)
    began = time.perf_counter()
    refused = [ask(front, {"text": "hello"}) for _ in range(3)]
    assert time.perf_counter() - began < 60.0 / 2  # not the request timeout's wait
    for response in refused:
        assert (response.status_code, response.headers["retry-after"]) == (503, "3")
        assert "no judge replica is running" in json.loads(response.body)["error"]["message"]
    assert front.engine.calls == [] and lookups == ["SafeConfJudge"]  # one lookup for the three, within the second
    running["SafeConfJudge"] = 1
    monkeypatch.setattr(front_module, "REPLICA_CHECK_S", 0.0)
    assert ask(front, {"text": "hello"}).status_code == 200 and len(front.engine.calls) == 1


def test_the_front_maps_each_engine_outcome_to_its_answer(monkeypatch):
    """Through the front's own request path with a fake engine handle: an answer is a 200 (the request's model sent
    as Serve's multiplexed model id, with a deadline); a dead or unavailable replica a 503 with Retry-After; an
    engine that takes no request before the deadline a 503 too (its call cancelled), bounded; the engine's own
    504 / 422 / 500 pass through without Retry-After."""
    from ray.exceptions import ActorDiedError

    import safeconf.serving.app as front_module

    async def answers(name, items, deadline):
        return {"result": [{"label": "safe", "kind": items[0].kind}]}

    front = front_with(answers, adapters=["policy-a"])
    response = ask(front, {"text": "hello", "model": "policy-a"})
    assert response.status_code == 200 and json.loads(response.body)["model"] == "policy-a"
    options, args, kwargs, _ = front.engine.calls[-1]
    assert options == {"method_name": "judge", "multiplexed_model_id": "policy-a"} and args[0] == "policy-a"
    assert 0 < kwargs["deadline"] - time.time() <= 5.0
    ask(front, {"text": "hello"})
    assert front.engine.calls[-1][0]["multiplexed_model_id"] == ""  # the main model: no multiplexing
    missing = ask(front, {"text": "hello", "model": "policy-z"})
    assert missing.status_code == 404 and len(front.engine.calls) == 2  # refused before the engine

    async def dies(name, items, deadline):
        raise ActorDiedError()

    died = ask(front_with(dies), {"text": "hello"})
    assert (died.status_code, died.headers["retry-after"]) == (503, "3")
    assert json.loads(died.body)["error"]["type"] == "service_unavailable"

    async def never(name, items, deadline):
        await asyncio.sleep(60)

    monkeypatch.setattr(front_module, "ENGINE_GRACE_S", 0.2)
    stuck = front_with(never, timeout_s=0.3)
    began = time.perf_counter()
    waited = ask(stuck, {"text": "hello"})
    assert time.perf_counter() - began < 2.0  # bounded: timeout + grace, not the engine's 60 s
    assert (waited.status_code, waited.headers["retry-after"]) == (503, "3")
    assert stuck.engine.calls[-1][-1].cancelled  # the queued call is dropped, not left waiting for a replica
    assert stuck.metrics.counted == [("/v1/judge", 503)]

    for status, kind in ((504, "timeout"), (422, "invalid_request_error"), (500, "internal_error"),
                         (503, "service_unavailable")):
        async def refuses(name, items, deadline, status=status, kind=kind):
            return {"error": {"status": status, "type": kind, "message": "from the engine", "param": None}}

        response = ask(front_with(refuses), {"text": "hello"})
        assert response.status_code == status and json.loads(response.body)["error"]["type"] == kind
        assert ("retry-after" in response.headers) == (status == 503)

    async def breaks(name, items, deadline):
        raise TypeError("not an infrastructure failure")

    broken = ask(front_with(breaks), {"text": "hello"})
    assert broken.status_code == 500 and "not an infrastructure" not in broken.body.decode()


def test_the_engine_answers_envelopes_within_the_requests_deadline():
    """The engine side of the same contract: its answer or error as data (no exception crosses to the front);
    504 when the work outlasts the replica's whole timeout, 503 when the request spent its time (or part of it)
    waiting for a replica."""
    from safeconf.serving import JudgeServer
    from safeconf.serving.schemas import ApiError

    server = JudgeServer.__new__(JudgeServer)
    server.timeout_s = 0.2

    async def quick(ends):
        return {"ok": True}

    async def slow(ends):
        await asyncio.sleep(5)

    async def refused(ends):
        raise ApiError(422, "text: too long", "text")

    async def broken(ends):
        raise RuntimeError("engine failed")

    def run(work, deadline):
        return asyncio.run(server._answered(work, deadline))

    soon = time.time() + 10
    assert run(quick, soon) == {"result": {"ok": True}}
    assert run(slow, soon)["error"]["status"] == 504  # this replica had its whole timeout (0.2 s): too slow
    server.timeout_s = 5.0
    waited = run(slow, time.time() + 0.3)  # most of the request's time went waiting for a replica
    assert (waited["error"]["status"], waited["error"]["type"]) == (503, "service_unavailable")
    server.timeout_s = 0.2
    assert run(refused, soon)["error"] == {"status": 422, "type": "invalid_request_error", "message": "text: too long",
                                           "param": "text"}
    assert run(broken, soon)["error"] == {"status": 500, "type": "internal_error",
                                          "message": "internal error; see the server log", "param": None}
    assert run(quick, time.time() - 1)["error"]["status"] == 503


def test_front_options_and_retry_after_config(monkeypatch):
    from safeconf.serving import deployment_options, front_options

    config = load_config(overrides=["serve.retry_after_s=7.5", "serve.min_replicas=2", "serve.max_replicas=3"])
    assert config.serve.problems() == []
    front = front_options(config)
    assert front["ray_actor_options"] == {"num_cpus": 0.1} and front["num_replicas"] == 2  # no model, no GPU
    assert front["user_config"] == {"request_timeout_s": 60.0, "retry_after_s": 7.5}
    # the front holds what the engine replicas hold and queue, so the engine's queue bound answers first
    assert front["max_ongoing_requests"] > 3 * config.serve.max_ongoing_requests + config.serve.max_queued_requests
    for options in (front, deployment_options(config)):  # Serve's own 503s (queues full) carry Retry-After too
        assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 7.5}
    for bad in ("0", "-1", "7200"):
        with pytest.raises(ValueError, match=r"serve\.retry_after_s"):
            load_config(overrides=[f"serve.retry_after_s={bad}"])
    monkeypatch.delenv("SAFECONF_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="retry_after_s"):
        build_app(load_config(overrides=["serve.retry_after_s=0"]))
