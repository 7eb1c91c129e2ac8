"""safeconf.guard: the guard-tuning SFT set (gold answers, no confidence; the pool kept apart from the calibration
and held-out questions; counts that reconcile) and the training settings it runs with."""

import json

import pyarrow.parquet as pq
import pytest

from safeconf.config import ALL_LINEAR, load_config
from safeconf.guard import build_guard_sft, guard_train_config


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return f"jsonl:{path}"


def judgement(i, text=None, answer=None):
    return {"id": f"q{i}", "source": "pool", "lang": "en", "task": "judge", "category": None,
            "question": text or f"Is it safe to answer this request? request {i}", "options": ["Safe", "Unsafe"],
            "answer": i % 2 if answer is None else answer}


def test_the_guard_set_is_gold_answers_without_confidence_kept_apart_from_calibration_and_held_out(tmp_path):
    pool = [judgement(i) for i in range(40)]
    pool.append({**judgement(40), "answer": None})  # no gold answer: left out, counted
    pool.append({"id": "bad", "lang": "en"})  # rejected at the door
    calibration = [judgement(100, text=pool[3]["question"], answer=pool[3]["answer"])]  # the same text as q3
    held_out = [judgement(200, text=pool[5]["question"], answer=pool[5]["answer"])]
    config = load_config(overrides=[f"out={tmp_path / 'run'}", f"guard.data={write_jsonl(tmp_path / 'p.jsonl', pool)}",
                                    f"data={write_jsonl(tmp_path / 'c.jsonl', calibration)}",
                                    f"eval.data={write_jsonl(tmp_path / 'h.jsonl', held_out)}",
                                    "guard.val_fraction=0.2"])
    counts = build_guard_sft(config, str(tmp_path / "run"))
    assert counts["read"] == 42 and counts["accepted"] + counts["rejected"] == 42 and counts["rejected"] == 1
    assert counts["left_out"] == {"no gold answer": 1, "also a calibration or held-out question": 2}
    assert sum(counts["examples"].values()) == counts["accepted"] - 3 == 38
    assert counts["examples"]["val"] > 0 and counts["examples"]["train"] > 0
    sft = tmp_path / "run" / "guard" / "sft"
    rows = pq.read_table(sft / "train.parquet").to_pylist() + pq.read_table(sft / "val.parquet").to_pylist()
    assert {r["question_id"] for r in rows} == {f"q{i}" for i in range(40)} - {"q3", "q5"}
    for row in rows:
        gold = int(row["question_id"][1:]) % 2
        assert row["target"] == f"Answer: {'AB'[gold]}" and row["confidence"] is None
        assert row["messages"][-1] == {"role": "assistant", "content": row["target"]}
        assert "Safe" in row["messages"][1]["content"] and "Unsafe" in row["messages"][1]["content"]
    rejects = pq.read_table(tmp_path / "run" / "guard" / "rejects.parquet").to_pylist()
    assert len(rejects) == 1 and rejects[0]["field"]
    # the question files beside the SFT set: what was trained on, in the question schema
    assert pq.read_table(sft / "train_questions.parquet").num_rows == counts["examples"]["train"]


def test_guard_variants_train_on_rule_variants_with_the_gold_answer_in_their_own_options(tmp_path):
    """guard.variants=3: each pool question also as 3 rule variants (shuffled options, flipped polarity, restyled
    labels), each target naming the variant's label of the same gold option; the pool's fingerprint changes only
    when the setting is on."""
    from safeconf.data.judge import judge_question
    from safeconf.stages import guard_plan

    pool = [{**judgement(i), "question": judge_question("en", "text", f"text {i}")} for i in range(10)]
    overrides = [f"out={tmp_path / 'run'}", f"guard.data={write_jsonl(tmp_path / 'p.jsonl', pool)}",
                 "guard.val_fraction=0.2", "mutation.operators=[shuffle,polarity,relabel,framing]"]
    config = load_config(overrides=overrides + ["guard.variants=3"])
    counts = build_guard_sft(config, str(tmp_path / "run"))
    assert counts["examples_by_variant"] == {"original": 10, "shuffle": 10, "polarity": 10, "relabel": 10}
    sft = tmp_path / "run" / "guard" / "sft"
    rows = pq.read_table(sft / "train.parquet").to_pylist() + pq.read_table(sft / "val.parquet").to_pylist()
    for row in rows:
        gold = int(row["question_id"][1:]) % 2  # Safe / Unsafe in the original's order
        prompt = row["messages"][-2]["content"]
        chosen = next(line for line in prompt.splitlines() if line.startswith(row["answer_label"] + "."))
        if row["mutation"] == "polarity":  # "Is the following text harmful?" Yes / No: Yes is the unsafe side
            assert chosen.endswith(["No", "Yes"][gold]), (row["mutation"], prompt, row["target"])
        else:
            assert chosen.endswith(["Safe", "Unsafe"][gold]), (row["mutation"], prompt, row["target"])
    plain = load_config(overrides=overrides)
    assert "variants" not in guard_plan(plain).inputs["sft"] and "variants" in guard_plan(config).inputs["sft"]


def test_a_pool_with_nothing_to_train_on_is_an_error_naming_the_setting(tmp_path):
    pool = [{**judgement(i), "answer": None} for i in range(3)]
    config = load_config(overrides=[f"out={tmp_path}", f"guard.data={write_jsonl(tmp_path / 'p.jsonl', pool)}"])
    with pytest.raises(ValueError, match=r"guard.data=.*no usable question \(3 read, 0 rejected, left out: "
                                         r"\{'no gold answer': 3\}\)"):
        build_guard_sft(config, str(tmp_path / "run"))


def test_guard_training_takes_the_guard_settings_and_the_train_sections_other_keys(tmp_path):
    config = load_config(overrides=["guard.data=jsonl:x", "guard.learning_rate=1e-3", "guard.snapshot_steps=5,10",
                                    "train.learning_rate=2e-4", "train.micro_batch_size=8", "train.merge=false"])
    tuned = guard_train_config(config)
    assert tuned.train.learning_rate == 1e-3 and config.train.learning_rate == 2e-4  # the original is untouched
    assert tuned.train.lora_target_modules == ALL_LINEAR and tuned.train.lora_alpha == 2 * tuned.train.lora_rank
    assert tuned.train.snapshot_steps == [5, 10] and tuned.train.merge
    assert tuned.train.micro_batch_size == 8 and tuned.train.run_name == "safeconf-train-guard"


@pytest.mark.parametrize("override,message", [
    ("guard.snapshot_steps=[0]", "guard.snapshot_steps must be a list of optimizer steps >= 1"),
    ("train.snapshot_steps=[a]", "train.snapshot_steps must be a list of optimizer steps >= 1"),
    ("guard.val_fraction=1", "guard.val_fraction must be in"),
    ("guard.lora_target_modules=[]", "guard.lora_target_modules must name at least one module"),
])
def test_bad_guard_settings_are_refused_by_the_config(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[override])
