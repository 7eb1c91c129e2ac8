"""LoRA fine-tuning on Ray Train + DeepSpeed: the data plan, the DeepSpeed config, SFT validation, and real runs
(two CPU workers, a tiny random Llama with the real SmolLM2 tokenizer and chat template) under ZeRO-2 and ZeRO-3:
loss falls, the exported adapter is whole and reproduces the trained weights, a re-run resumes, a dying worker is
survived. One run fine-tunes the real SmolLM2."""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safeconf.config import load_config
from safeconf.schema import DataFormatError
from safeconf.sft import SFT_SCHEMA
from safeconf.train import run_training, training_precision
from safeconf.train.data import (
    Examples,
    Plan,
    causal_lm_loss,
    collate,
    encode_example,
    end_of_turn,
    load_tokenizer,
    read_sft_file,
    tokenize_batch,
)
from safeconf.train.worker import FAIL_AT_STEP_ENV, FAIL_MARKER_ENV, FAIL_MODE_ENV, deepspeed_config, lr_lambda

SYSTEM = "You are a helpful assistant that evaluates the safety of content."


def sft_row(i: int, user: str | None = None, target: str | None = None, messages=None) -> dict:
    label = "AB"[i % 2]
    question = f"Question {i}: is it safe to share a stranger's home address online?"
    user = user or f"{question}\n\nOptions:\nA. Safe\nB. Unsafe\n\nReply as Answer: <label> Confidence: <n>%"
    target = target if target is not None else f"Answer: {label}\nConfidence: {60 + 10 * (i % 4)}%"
    messages = messages or [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                            {"role": "assistant", "content": target}]
    return {"question_id": f"q{i}", "variant_id": f"q{i}-0", "mutation": "original", "lang": "en", "task": "judge",
            "category": "privacy", "messages": messages, "target": target, "answer_label": label, "confidence": 0.7}


def write_sft(folder, train_rows, val_rows, schema=SFT_SCHEMA):
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(train_rows, schema=schema), folder / "train.parquet")
    pq.write_table(pa.Table.from_pylist(val_rows, schema=schema), folder / "val.parquet")
    return folder


@pytest.fixture(scope="module")
def tokenizer_path():
    from safeconf.models import resolve_model

    return resolve_model()  # the embedded SmolLM2: a real tokenizer and chat template


# --- fast: pure functions and validation ---


def epoch_steps(plan: Plan, lengths: np.ndarray, rank: int, epoch: int) -> list[list[np.ndarray]]:
    """A rank's steps of one epoch as stream positions, window after window (as the worker reads them)."""
    steps = []
    for w, start in enumerate(range(0, len(lengths), plan.window_rows)):
        window = lengths[start:start + plan.window_rows]
        steps += [[start + m for m in step] for step in plan.window_steps(window, rank, epoch, w)]
    return steps


def test_plan_is_deterministic_disjoint_equal_per_rank_and_length_grouped():
    rows, world, mbs, acc = 70, 2, 4, 2
    plan = Plan(world, mbs, acc, group_window=2, seed=1)  # windows of 32 rows: 32, 32 and a last one of 6
    lengths = np.random.default_rng(0).integers(20, 400, rows)
    steps, left_out = plan.epoch_counts(rows)
    assert (steps, left_out) == (5, 0)  # 2 + 2 full steps, then 3 rows per rank: one short step of 2 micro-batches
    plans = [epoch_steps(plan, lengths, r, epoch=0) for r in range(world)]
    assert all(len(p) == steps and all(len(step) == acc for step in p) for p in plans)
    seen = np.concatenate([m for p in plans for step in p for m in step])
    assert len(seen) == len(set(seen.tolist())) == 70  # every example once, none twice
    again = epoch_steps(plan, lengths, 1, epoch=0)
    assert all(np.array_equal(a, b) for s1, s2 in zip(plans[1], again) for a, b in zip(s1, s2))
    other = epoch_steps(plan, lengths, 1, epoch=1)
    assert not all(np.array_equal(a, b) for s1, s2 in zip(plans[1], other) for a, b in zip(s1, s2))  # new each epoch
    # length grouping: the padding of the plan's micro-batches is a fraction of a random split's
    padded = lambda p: sum(len(m) * lengths[m].max() - lengths[m].sum() for step in p for m in step)  # noqa: E731
    ungrouped = [[np.array_split(part, acc) for part in np.array_split(np.random.default_rng(2).permutation(64), 8)]]
    assert padded(plans[0]) + padded(plans[1]) < 0.5 * padded(ungrouped[0])
    assert Plan(2, 4, 2, 16, 0).epoch_counts(9) == (1, 1)  # one odd example per epoch, counted
    assert Plan(2, 4, 4, 16, 0).epoch_counts(5) == (0, 5)  # too few: run_training refuses it with a clear error
    assert Plan(1, 4, 1, 16, 0).epoch_counts(618) == (155, 0)  # 9 full windows of 64 + 42 rows: 10 + 1 short step


def test_left_padded_loss_on_the_last_positions_equals_the_full_loss(tokenizer_path):
    """collate + causal_lm_loss (logits of the last positions only) give transformers' own labels loss."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_path)
    eot = end_of_turn(tokenizer)
    encoded = [encode_example(tokenizer, sft_row(i, target=f"Answer: A\nConfidence: {i}0%")["messages"], eot)
               for i in (1, 23)] + [encode_example(tokenizer, sft_row(3, user="short?")["messages"], eot)]
    examples = Examples([np.asarray(ids) for ids, _ in encoded], np.array([p for _, p in encoded]), np.arange(3))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    batch = collate(examples, [0, 1, 2], tokenizer.pad_token_id)
    assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][2, 0]  # left padding
    with torch.no_grad():
        loss, tokens = causal_lm_loss(model, batch)
        one_by_one = [model(input_ids=torch.tensor([ids]), labels=torch.tensor([[-100] * p + ids[p:]]))
                      for ids, p in encoded]
    target_tokens = [len(ids) - p for ids, p in encoded]
    expected = sum(out.loss * n for out, n in zip(one_by_one, target_tokens)) / sum(target_tokens)
    assert tokens == sum(target_tokens)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_deepspeed_config_and_precision():
    config = load_config(overrides=["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
                                    "train.zero3_persistence_threshold=0", "train.gradient_accumulation=2"])
    ds = deepspeed_config(config.train, world_size=2, precision=training_precision(config))
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_param_persistence_threshold"] == 0
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    # gathered parameters are bounded (DeepSpeed's default of 1e9 keeps a 1-2B model gathered: no saving)
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 100_000_000
    assert zero["stage3_prefetch_bucket_size"] <= zero["stage3_max_live_parameters"]
    with pytest.raises(ValueError, match="train.zero3_max_live_parameters must be at least 1"):
        load_config(overrides=["train.zero3_max_live_parameters=0"])
    assert ds["train_batch_size"] == 4 * 2 * 2 and not ds["fp16"]["enabled"]
    assert training_precision(load_config(overrides=["train.use_gpu=true"])) == "bf16"
    from safeconf import models
    from safeconf.train.worker import worker_precision

    gpu = load_config(overrides=["train.use_gpu=true"]).train
    for has_bf16, expected in ((True, "bf16"), (False, "fp16")):  # False: a V100 or T4, decided on the worker
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(models, "gpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
            assert worker_precision("bf16", gpu) == expected
            assert worker_precision("bf16", load_config(overrides=["train.use_gpu=true",
                                                                    "train.precision=bf16"]).train) == "bf16"
    assert training_precision(load_config(overrides=["train.precision=fp32"])) == "fp32"
    fp32 = deepspeed_config(config.train, world_size=2, precision="fp32")
    assert not fp32["bf16"]["enabled"] and deepspeed_config(config.train, 2, "bf16")["bf16"]["enabled"]
    with pytest.raises(ValueError, match="fp16 training is not supported on CPU"):
        training_precision(load_config(overrides=["model.dtype=float16"]))
    with pytest.raises(ValueError, match="train.precision must be"):
        load_config(overrides=["train.precision=int8"])
    factor = lr_lambda(total_steps=100, warmup_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5) and factor(100) == 0.0


def test_labels_cover_only_the_target_and_end_of_turn(tokenizer_path):
    tokenizer = load_tokenizer(tokenizer_path)
    eot = end_of_turn(tokenizer)
    assert eot == "<|im_end|>"
    row = sft_row(1)
    ids, prompt_tokens = encode_example(tokenizer, row["messages"], eot)
    prompt_text = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(ids[:prompt_tokens]) == prompt_text
    assert tokenizer.decode(ids[prompt_tokens:]) == row["target"] + "<|im_end|>"

    table = pa.table({"messages": [row["messages"], sft_row(2, user="word " * 400)["messages"]], "row": [0, 1]})
    out = tokenize_batch(table, tokenizer_path, max_length=128).to_pylist()
    assert out[0]["skip"] is None and out[0]["input_ids"] == ids and out[0]["prompt_tokens"] == prompt_tokens
    assert out[1]["skip"] == "too_long" and out[1]["input_ids"] == [] and out[1]["num_tokens"] > 128  # skipped, not cut


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"target": ""}, "row 3, column 'messages': empty target"),
        ({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]},
         "row 3, column 'messages': the last message is from 'user', not the assistant"),
        ({"messages": [{"role": "assistant", "content": "Answer: A"}]}, "row 3, column 'messages': no prompt"),
    ],
)
def test_bad_sft_rows_stop_the_run_naming_file_row_and_column(tmp_path, bad, message):
    rows = [sft_row(i) for i in range(6)]
    rows[3] = sft_row(3, target=bad.get("target"), messages=bad.get("messages"))
    folder = write_sft(tmp_path / "sft", rows, rows[:2])
    with pytest.raises(DataFormatError, match=message) as error:
        read_sft_file(str(folder / "train.parquet"))
    assert str(folder / "train.parquet") in str(error.value)
    # run_training checks before Ray or any worker starts
    with pytest.raises(DataFormatError, match="train.parquet: row 3"):
        run_training(load_config(), str(folder), str(tmp_path / "out"))


def test_missing_messages_column_is_named(tmp_path):
    folder = tmp_path / "sft"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["q"], "completion": ["Answer: A"]}), folder / "train.parquet")
    pq.write_table(pa.table({"prompt": ["q"], "completion": ["Answer: A"]}), folder / "val.parquet")
    with pytest.raises(DataFormatError, match=r"train.parquet: no 'messages' column \(columns: prompt, completion\)"):
        run_training(load_config(), str(folder), str(tmp_path / "out"))


# --- real runs on a tiny model: two CPU workers ---

TRAIN_ROWS, VAL_ROWS, LONG_ROWS = 64, 10, 3


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(tokenizer_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.3,  # large enough logits to learn fast
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    train = [sft_row(i) for i in range(TRAIN_ROWS)]
    for i in (5, 20, 41):  # over-long rows: skipped and counted
        train[i] = sft_row(i, user="a very long question " * 80)
    val = [sft_row(1000 + i) for i in range(VAL_ROWS)]
    return write_sft(tmp_path_factory.mktemp("data") / "sft", train, val)


def tiny_config(model: str, out, name: str, *extra: str):
    return load_config(overrides=[
        f"model.name={model}", f"out={out}", "train.num_workers=2", "train.cpus_per_worker=1", "train.epochs=2",
        "train.micro_batch_size=4", "train.max_length=160", "train.learning_rate=1e-2", "train.warmup_ratio=0.1",
        "train.lora_rank=8", "train.lora_alpha=16", "train.lora_dropout=0",  # no dropout: runs are reproducible
        "train.lora_target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "train.log_every=2", "train.checkpoint_every=3", "train.max_failures=0", f"train.run_name={name}",
        "model.dtype=float32", *extra,
    ])


# 61 usable rows / 2 workers = 30 each (1 left out per epoch), 8 steps of 4 (the last one of 2) per epoch
STEPS_PER_EPOCH, TOTAL_STEPS = 8, 16


def train_tiny(local_ray, tiny_model, tiny_sft, out, name, *extra, fail_at=None, monkeypatch=None):
    if fail_at:
        monkeypatch.setenv(FAIL_AT_STEP_ENV, str(fail_at))
        monkeypatch.setenv(FAIL_MODE_ENV, "exit")
        monkeypatch.setenv(FAIL_MARKER_ENV, str(out) + ".fail-marker")
    try:
        return run_training(tiny_config(tiny_model, out, name, *extra), str(tiny_sft), str(out))
    finally:
        if fail_at:
            for env in (FAIL_AT_STEP_ENV, FAIL_MODE_ENV, FAIL_MARKER_ENV):
                monkeypatch.delenv(env)


@pytest.fixture(scope="module")
def zero2_run(local_ray, tiny_model, tiny_sft, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    return out, train_tiny(local_ray, tiny_model, tiny_sft, out, "zero2", "train.zero_stage=2", "train.merge=true",
                           "train.snapshot_steps=[4]")


@pytest.fixture(scope="module")
def zero3_run(local_ray, tiny_model, tiny_sft, tmp_path_factory):
    """ZeRO-3 with every parameter partitioned (LoRA too), and a worker that dies at step 5: survived."""
    out = tmp_path_factory.mktemp("zero3")
    with pytest.MonkeyPatch.context() as monkeypatch:
        summary = train_tiny(local_ray, tiny_model, tiny_sft, out, "zero3", "train.zero_stage=3",
                             "train.zero3_persistence_threshold=0", "train.max_failures=1",
                             fail_at=5, monkeypatch=monkeypatch)
    return out, summary


def logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(input_ids=tokens).logits


def sample_tokens(tokenizer_path):
    import torch

    tokenizer = load_tokenizer(tokenizer_path)
    ids, _ = encode_example(tokenizer, sft_row(7)["messages"], end_of_turn(tokenizer))
    return torch.tensor([ids])


@pytest.mark.slow
def test_zero2_run_learns_and_counts_skips(zero2_run):
    out, summary = zero2_run
    assert summary["steps"] == summary["total_steps"] == TOTAL_STEPS and summary["steps_per_epoch"] == STEPS_PER_EPOCH
    assert summary["starts"] == [0] and summary["epochs"] == 2
    losses = [loss for _, loss in summary["train_loss"]]
    assert losses[-1] < 0.5 * losses[0], losses  # the targets are easy to learn
    assert len(summary["val_loss_per_epoch"]) == 2
    assert summary["val_loss_per_epoch"][1] < summary["val_loss_per_epoch"][0]
    train = summary["examples"]["train"]
    assert train["rows"] == TRAIN_ROWS and train["kept"] == TRAIN_ROWS - LONG_ROWS
    assert train["skipped"]["too_long"]["count"] == LONG_ROWS and train["skipped"]["too_long"]["rows"] == [5, 20, 41]
    assert summary["examples"]["left_out_per_epoch"] == 1
    assert summary["tokens_per_s"] > 0 and len(summary["peak_rss_mb_per_worker"]) == 2
    memory = summary["memory_mb_per_worker"]  # every worker's snapshots, in the order training reaches them
    assert len(memory) == 2 and all(set(m) == {"after_load", "after_initialize", "last_report"} for m in memory)
    for worker in memory:
        assert all(0 < p["anon"] <= p["rss"] <= p["peak"] for p in worker.values())
        assert worker["after_load"]["peak"] <= worker["last_report"]["peak"]
    assert json.loads((out / "train_summary.json").read_text())["steps"] == TOTAL_STEPS


@pytest.mark.slow
@pytest.mark.parametrize("run", ["zero2_run", "zero3_run"])
def test_exported_adapter_is_whole_and_matches_the_trained_weights(request, run, tiny_model, tokenizer_path):
    """The adapter reloads with peft and gives the logits of the weights DeepSpeed saved at the end (its fp32
    master copy, read from the ZeRO shards), so nothing was lost to ZeRO-3 partitioning."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, summary = request.getfixturevalue(run)
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists()
    weights = load_file(adapter / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2  # lora_A and lora_B of 7 modules in 2 layers
    assert all(t.numel() > 0 and t.dim() == 2 for t in weights.values())
    assert all(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # trained (they start at zero)

    checkpoint = summary["checkpoint"]
    tag = json.loads(open(f"{checkpoint}/train_state.json").read())["tag"]
    master = get_fp32_state_dict_from_zero_checkpoint(checkpoint, tag=tag, exclude_frozen_parameters=True)
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    )
    missing, unexpected = reference.load_state_dict(master, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tokens = sample_tokens(tokenizer_path)
    expected = logits(reference.eval(), tokens)
    torch.testing.assert_close(logits(reloaded.eval(), tokens), expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits(base, tokens), expected, atol=1e-3)  # the adapter changes the model


@pytest.mark.slow
def test_merged_model_loads_with_transformers(zero2_run, tiny_model, tokenizer_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = zero2_run
    assert summary["merged"].endswith("merged")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                         out / "adapter")
    tokens = sample_tokens(tokenizer_path)
    torch.testing.assert_close(logits(merged, tokens), logits(reloaded.eval(), tokens), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_a_snapshot_step_exports_that_steps_adapter_beside_the_run(zero2_run):
    """train.snapshot_steps=[4]: the adapter as it was at step 4 (a learning curve's point), not the final one. The
    resume test below compares this run's final weights with a run without snapshots: a snapshot changes nothing."""
    import torch
    from safetensors.torch import load_file

    out, _ = zero2_run
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-4"]
    snapshot = load_file(out / "snapshots" / "step-4" / "adapter_model.safetensors")
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    assert snapshot.keys() == final.keys()
    assert any(not torch.allclose(snapshot[k], final[k]) for k in final)  # 12 more steps moved the weights


@pytest.mark.slow
def test_rerun_with_the_same_name_resumes_where_it_stopped(local_ray, tiny_model, tiny_sft, zero2_run,
                                                          tmp_path, monkeypatch):
    """Stopped by a failure at step 5 (no retries; last checkpoint at step 3, mid-epoch), then run again: it starts
    at step 3, ends at the same step count, and ends with the same weights as the uninterrupted run, so no step
    was lost or repeated and the data order was the same."""
    import torch
    from ray.train import TrainingFailedError
    from safetensors.torch import load_file

    out = tmp_path / "resumed"
    with pytest.raises(TrainingFailedError):
        train_tiny(local_ray, tiny_model, tiny_sft, out, "resume", fail_at=5, monkeypatch=monkeypatch)
    assert not (out / "adapter").exists()
    summary = train_tiny(local_ray, tiny_model, tiny_sft, out, "resume")
    assert summary["start_step"] == 3 and summary["starts"] == [0, 3]
    assert summary["steps"] == TOTAL_STEPS == zero2_run[1]["steps"]
    uninterrupted = load_file(zero2_run[0] / "adapter" / "adapter_model.safetensors")
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-4, atol=1e-5)
    # the same val losses too: the second epoch was trained on the same data in the same order
    assert summary["val_loss_per_epoch"] == pytest.approx(zero2_run[1]["val_loss_per_epoch"], rel=1e-4)


@pytest.mark.slow
def test_zero3_survives_a_dying_worker(zero3_run):
    out, summary = zero3_run
    assert summary["steps"] == TOTAL_STEPS
    assert summary["starts"][0] == 0 and summary["starts"][-1] == 3  # restarted from the step-3 checkpoint
    losses = [loss for _, loss in summary["train_loss"]]
    assert losses[-1] < 0.5 * losses[0]
    assert (out.parent / (out.name + ".fail-marker")).exists()  # it did fire, once


@pytest.mark.slow
def test_workers_no_node_can_place_fail_the_run_within_its_start_timeout(local_ray, tiny_model, tiny_sft, tmp_path):
    # 64 CPUs per worker on a 4-CPU Ray: Ray Train's own default retries the placement without end
    config = tiny_config(tiny_model, tmp_path / "out", "unplaceable", "train.cpus_per_worker=64",
                         "train.start_timeout_s=2", "train.max_failures=1")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not place 2 workers .* within train.start_timeout_s=2 s, 2 attempts"):
        run_training(config, str(tiny_sft), str(tmp_path / "out"))
    assert time.monotonic() - started < 90  # two 2 s attempts and Ray's set-up, not a wait without end


# --- the real embedded model ---


@pytest.mark.slow
def test_smollm2_fine_tunes_end_to_end(local_ray, tmp_path, tokenizer_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from safeconf.data.loaders import read_questions
    from safeconf.prompts import format_target, labels_for, render_messages

    rows = []
    for i, raw in enumerate(r for r in read_questions("embedded") if r.record):
        q = raw.record
        labels = labels_for("upper", len(q["options"]))
        variant = {"lang": q["lang"], "question": q["question"], "options": q["options"], "labels": labels, "framing": 0}
        target = format_target(q["lang"], labels[q["answer"]], 0.8)
        rows.append({**sft_row(i, target=target), "lang": q["lang"], "target": target,
                     "messages": render_messages(variant) + [{"role": "assistant", "content": target}]})
        if len(rows) == 10:
            break
    folder = write_sft(tmp_path / "sft", rows[:8], rows[8:])
    out = tmp_path / "run"
    config = load_config(overrides=[
        f"out={out}", "train.num_workers=1", "train.cpus_per_worker=2", "train.micro_batch_size=2",
        "train.max_steps=3", "train.log_every=1", "train.checkpoint_every=100", "train.max_length=384",
        "train.learning_rate=1e-3", "train.run_name=smollm2",
    ])
    summary = run_training(config, str(folder), str(out))
    assert summary["steps"] == 3 and np.isfinite(summary["final_train_loss"])
    assert summary["examples"]["train"]["kept"] == 8 and summary["tokens_per_s"] > 0
    base = AutoModelForCausalLM.from_pretrained(tokenizer_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out / "adapter")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


@pytest.mark.slow
def test_the_guard_stage_trains_on_gold_answers_and_merges_the_model_later_stages_use(local_ray, tiny_model, tmp_path):
    """The guard stage end to end on the tiny model: pool -> gold-answer SFT set -> Ray Train -> merged folder, and a
    rerun of the same stage is restored, not retrained."""
    import torch
    from transformers import AutoModelForCausalLM

    from safeconf import stages

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({
        "id": f"g{i}", "source": "pool", "lang": "en", "task": "judge", "category": None,
        "question": f"Is it safe to comply with the following request?\n\nRequest: item {i}",
        "options": ["Safe", "Unsafe"], "answer": i % 2}) + "\n" for i in range(24)), encoding="utf-8")
    config = tiny_config(tiny_model, tmp_path / "run", "guard-e2e", f"guard.data=jsonl:{pool}",
                         "guard.val_fraction=0.25", "guard.max_steps=3", "guard.snapshot_steps=[2]",
                         "guard.lora_target_modules=[q_proj,v_proj]", "train.num_workers=1")
    report = stages.run_job(config, ["guard"])
    assert report["guard"]["status"] == "ran"
    run = tmp_path / "run"
    summary = json.loads((run / "guard" / "guard_summary.json").read_text())
    assert sum(summary["pool"]["examples"].values()) == 24 and summary["train"]["steps"] == 3
    assert summary["model"] == str(run / "guard" / "merged")
    assert (run / "guard" / "snapshots" / "step-2" / "adapter_config.json").exists()
    adapter = json.loads((run / "guard" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]  # the guard's LoRA, not train.lora_target_modules
    merged = AutoModelForCausalLM.from_pretrained(run / "guard" / "merged")
    assert merged.dtype == torch.float32  # trained in fp32: stored in fp32, no LoRA delta rounded away
    assert stages.stage_config(config).model.name == str(run / "guard" / "merged")
    again = stages.run_job(config, ["guard"])
    assert again["guard"]["status"] == "up to date"


def test_gradient_checkpointing_gives_the_same_lora_gradients(tiny_model, tokenizer_path):
    """train.gradient_checkpointing recomputes activations in the backward pass: less memory, the same gradients
    on every LoRA matrix (and none on the frozen weights)."""
    import torch

    from safeconf.train.worker import build_model

    tokens = sample_tokens(tokenizer_path)
    grads = {}
    for checkpointing in (False, True):
        config = tiny_config(tiny_model, "/tmp/unused", "gc", f"train.gradient_checkpointing={checkpointing}")
        model, _ = build_model(tiny_model, config.train, "fp32", {})
        model.train()
        assert model.base_model.model.is_gradient_checkpointing is checkpointing
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        # LoRA B starts at zero, so at the first step only the B matrices get a gradient
        assert all(g.abs().sum() > 0 for n, g in grads[checkpointing].items() if "lora_B" in n)
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6)
