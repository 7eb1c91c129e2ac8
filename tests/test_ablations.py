"""The ablations are settings of the SFT set built from one confidence table: no confidence in the target
(sft.confidence_format=none, evaluated by the adapter's option probability), confidence from the original
question's samples only (sft.confidence_from=original), the majority answer (sft.target=majority)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safeconf.config import DEFAULT_EVAL_METHODS, EVAL_METHODS, SFTConfig, load_config
from safeconf.confidence import question_confidence
from safeconf.evaluation.methods import ADAPTER_METHODS, JudgeSettings, engine_method, judge, judge_each
from safeconf.evaluation.runner import method_plan
from safeconf.mutations import RULE_OPERATORS, mutate_rules, original_variant
from safeconf.prompts import INSTRUCTIONS, format_target
from safeconf.replies import parse_answer
from safeconf.schema import CONFIDENCE_SCHEMA
from safeconf.sft import build_sft, sft_examples
from safeconf.stages import config_inputs, fingerprint
from safeconf.testing.engines import ScriptedEngine


def confidence_row(qid, answer, picks_per_variant):
    """A question with 4 rule variants; variant i's samples pick the original options picks_per_variant[i]."""
    q = {"id": qid, "source": "t", "lang": "en", "task": "mcq", "category": "c", "question": "Which?",
         "options": ["w", "x", "y", "z"], "answer": answer}
    row = mutate_rules(q, list(RULE_OPERATORS), 3, seed=0)
    assert row["variants"][0]["mutation"] == "original"
    for variant, picks in zip(row["variants"], picks_per_variant):
        variant["samples"] = [{"text": "", "choice": variant["option_map"].index(p), "choice_original": p,
                               "verbal_confidence": None, "choice_logprob": None, "num_tokens": 1} for p in picks]
    return question_confidence(row)


# the original's samples: 3 of 4 right (option 2); the mutated variants' all wrong (option 1)
ROW_PICKS = [[2, 2, 2, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]


# --- (a) no confidence in the target ---


def test_confidence_format_none_targets_state_the_answer_only():
    row = confidence_row("q", 2, ROW_PICKS)
    examples, skipped = sft_examples(row, SFTConfig(confidence_format="none", include_variants=True))
    assert skipped is None and len(examples) == 4
    for example, variant in zip(examples, row["variants"]):
        assert example["target"] == f"Answer: {example['answer_label']}"
        assert "Confidence" not in example["target"] and example["messages"][-1]["content"] == example["target"]
        assert example["confidence"] is None  # the table records what the target states
        parsed = parse_answer(example["target"], variant["options"], variant["labels"])
        assert parsed.confidence is None and variant["option_map"][parsed.choice] == 2  # the gold answer
    assert format_target("zh", "B", None, "none") == "答案：B"
    # the default format still states it
    (percent, *_), _ = sft_examples(row, SFTConfig())
    assert percent["target"].endswith("Confidence: 19%") and percent["confidence"] == pytest.approx(3 / 16)


class RecordingEngine(ScriptedEngine):
    """Option scores only: 0.7 on the second label, the rest shared; records every prompt it scores."""

    def __init__(self):
        self.scored = []

    def option_logprobs(self, prompts, answer_prefixes, labels):
        self.scored += prompts
        return [[math.log(0.7) if i == 1 else math.log(0.3 / (len(ls) - 1)) for i in range(len(ls))] for ls in labels]

    def generate(self, *args, **kwargs):
        raise AssertionError("adapter_token_prob generates nothing")


def test_adapter_token_prob_scores_the_prompt_the_adapter_was_trained_on():
    assert ADAPTER_METHODS["adapter_token_prob"] == engine_method("adapter_token_prob") == "token_prob_instructed"
    assert method_plan(["safeconf", "adapter_token_prob"], "adapter")["safety"] == {
        "safeconf": "verbalized", "adapter_token_prob": "token_prob_instructed"}
    assert "adapter_token_prob" not in method_plan(EVAL_METHODS, "base")["safety"]  # the adapter's alone
    assert "adapter_token_prob" in EVAL_METHODS and "adapter_token_prob" not in DEFAULT_EVAL_METHODS

    variant = original_variant({"id": "q", "lang": "en", "question": "Which?", "options": ["w", "x", "y"],
                                "answer": 1})
    settings = JudgeSettings(24, ("\n\n",), 1.0)
    engine = RecordingEngine()
    (found,) = judge(engine, [variant], "adapter_token_prob", settings)
    assert (found.choice, found.confidence, found.fallback) == (1, pytest.approx(0.7), False)
    assert found.probs == pytest.approx([0.15, 0.7, 0.15])
    (instructed,) = engine.scored
    assert instructed[-1]["content"].endswith(INSTRUCTIONS["en"])  # the training prompt, instruction included
    # token_prob itself scores without the instruction; one batch can want both
    engine = RecordingEngine()
    (both,) = judge_each(engine, [variant], [{"token_prob", "token_prob_instructed"}], settings)
    assert set(both) == {"token_prob", "token_prob_instructed"}
    assert sorted(INSTRUCTIONS["en"] in p[-1]["content"] for p in engine.scored) == [False, True]


# --- (b) confidence from the original question only ---


def test_original_only_confidence_is_the_original_variants_self_consistency():
    row = confidence_row("q", 2, ROW_PICKS)
    assert row["confidence"] == pytest.approx(3 / 16)  # over all 16 samples
    original = question_confidence({**row, "variants": row["variants"][:1]})
    (example, *_), _ = sft_examples(row, SFTConfig(confidence_from="original"))
    assert example["confidence"] == original["confidence"] == pytest.approx(0.75)
    assert example["target"].endswith("Confidence: 75%")
    # the majority target takes the original's majority and agreement too: option 2 at 3/4, not option 1
    (majority, *_), _ = sft_examples(row, SFTConfig(target="majority", confidence_from="original",
                                                    include_variants=False))
    assert majority["answer_label"] == "C" and majority["confidence"] == pytest.approx(0.75)
    (everything, *_), _ = sft_examples(row, SFTConfig(target="majority", include_variants=False))
    assert everything["answer_label"] == "B" and everything["confidence"] == pytest.approx(13 / 16)


def test_original_only_needs_exactly_one_original_variant():
    row = confidence_row("q7", 2, ROW_PICKS)
    row["variants"] = row["variants"][1:]
    with pytest.raises(ValueError, match="q7.*variants.*original"):
        sft_examples(row, SFTConfig(confidence_from="original"))


# --- (c) the majority target, end to end through build_sft ---


def test_majority_target_without_gold_labels_builds_a_set(tmp_path):
    rows = [confidence_row(f"q{i}", None, [[i % 4] * 4] * 4) for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CONFIDENCE_SCHEMA), tmp_path / "c.parquet")
    assert build_sft(str(tmp_path / "c.parquet"), str(tmp_path / "gold"), SFTConfig())["skipped"] == {
        "no gold answer": 40}
    counts = build_sft(str(tmp_path / "c.parquet"), str(tmp_path / "sft"),
                       SFTConfig(target="majority", include_variants=False, val_fraction=0.25))
    examples = pq.read_table(tmp_path / "sft" / "train.parquet").to_pylist()
    examples += pq.read_table(tmp_path / "sft" / "val.parquet").to_pylist()
    assert sum(counts["examples"].values()) == len(examples) == 40 and counts["skipped"] == {}
    for example in examples:
        i = int(example["question_id"][1:])
        assert example["answer_label"] == "ABCD"[i % 4] and example["target"].endswith("Confidence: 100%")


def test_build_sft_from_a_subset_of_the_questions(tmp_path):
    rows = [confidence_row(f"q{i}", i % 4, [[i % 4] * 4] * 4) for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CONFIDENCE_SCHEMA), tmp_path / "c.parquet")
    wanted = {f"q{i}" for i in range(0, 30, 3)}
    counts = build_sft(str(tmp_path / "c.parquet"), str(tmp_path / "sft"),
                       SFTConfig(include_variants=False, val_fraction=0.2), question_ids=wanted)
    found = {e["question_id"] for split in ("train", "val")
             for e in pq.read_table(tmp_path / "sft" / f"{split}.parquet").to_pylist()}
    assert found == wanted and sum(counts["questions"].values()) == len(wanted)
    with pytest.raises(ValueError, match="1 question ids.*not in.*nope"):
        build_sft(str(tmp_path / "c.parquet"), str(tmp_path / "sft2"), SFTConfig(), question_ids={"q1", "nope"})


# --- the settings ---


@pytest.mark.parametrize("key, bad", [("sft.confidence_format", "verbal"), ("sft.confidence_from", "mutations"),
                                      ("sft.target", "silver")])
def test_config_rejects_bad_ablation_values_naming_the_key(key, bad):
    with pytest.raises(ValueError, match=rf"{key} must be one of .*got '{bad}'"):
        load_config(overrides=[f"{key}={bad}"])


def test_ablation_settings_load_and_enter_the_pipeline_fingerprint():
    config = load_config(overrides=["sft.confidence_format=none", "sft.confidence_from=original",
                                    "sft.target=majority"])
    assert (config.sft.confidence_format, config.sft.confidence_from, config.sft.target) == ("none", "original",
                                                                                            "majority")
    base = config_inputs(load_config(), "pipeline")
    for override in ("sft.confidence_from=original", "sft.confidence_format=none"):
        changed = config_inputs(load_config(overrides=[override]), "pipeline")
        key = override.split("=")[0]
        assert base[key] != changed[key] and fingerprint(base) != fingerprint(changed)
    assert "sft.confidence_from" not in config_inputs(load_config(), "train")  # training reads the set it is given
