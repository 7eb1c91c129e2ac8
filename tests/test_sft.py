"""The fine-tuning set: targets in the prompt's labels, gold or majority, split by question id."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safeconf.config import SFTConfig
from safeconf.confidence import question_confidence
from safeconf.mutations import RULE_OPERATORS, mutate_rules
from safeconf.replies import parse_answer
from safeconf.schema import CONFIDENCE_SCHEMA
from safeconf.sft import build_sft, sft_examples, split_of


def confidence_row(qid, answer, picks):
    """A question with rule variants whose every sample picks original option `picks[i]` (variant i)."""
    q = {"id": qid, "source": "t", "lang": "en", "task": "mcq", "category": "c", "question": "Which?",
         "options": ["w", "x", "y", "z"], "answer": answer}
    row = mutate_rules(q, list(RULE_OPERATORS), 3, seed=0)
    for variant, pick in zip(row["variants"], picks):
        variant["samples"] = [{"text": "", "choice": variant["option_map"].index(pick), "choice_original": pick,
                               "verbal_confidence": None, "choice_logprob": None, "num_tokens": 1}] * 2
    return question_confidence(row)


def test_gold_target_names_the_right_option_in_each_variants_labels():
    row = confidence_row("q", answer=2, picks=[2, 2, 1, 2])
    examples, skipped = sft_examples(row, SFTConfig(target="gold", include_variants=True))
    assert skipped is None and len(examples) == 4
    for example, variant in zip(examples, row["variants"]):
        assert example["confidence"] == 0.75 and example["target"].endswith("Confidence: 75%")
        assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
        parsed = parse_answer(example["target"], variant["options"], variant["labels"])
        assert variant["option_map"][parsed.choice] == 2


def test_by_default_one_example_per_question_on_its_original_prompt():
    row = confidence_row("q", answer=2, picks=[2, 2, 1, 2])
    (example, *rest), _ = sft_examples(row, SFTConfig())
    assert not rest and example["variant_id"] == row["variants"][0]["variant_id"]
    assert example["mutation"] == "original" and example["confidence"] == 0.75  # measured over every variant


def test_majority_target_needs_no_labels_and_uses_agreement():
    row = confidence_row("q", answer=None, picks=[1, 1, 1, 3])
    assert sft_examples(row, SFTConfig(target="gold")) == ([], "no gold answer")
    examples, _ = sft_examples(row, SFTConfig(target="majority", include_variants=False, confidence_format="bucket"))
    assert len(examples) == 1 and examples[0]["answer_label"] == "B"
    assert examples[0]["target"] == "Answer: B\nConfidence: high"  # agreement 0.75 -> "high"


def test_split_is_by_question_and_stable():
    ids = [f"q{i}" for i in range(2000)]
    splits = [split_of(i, 0.2, seed=0) for i in ids]
    assert splits == [split_of(i, 0.2, seed=0) for i in ids]
    assert splits.count("val") / len(ids) == pytest.approx(0.2, abs=0.03)
    assert splits != [split_of(i, 0.2, seed=1) for i in ids]


def test_build_sft_keeps_every_variant_of_a_question_on_one_side(tmp_path):
    rows = [confidence_row(f"q{i}", answer=i % 4, picks=[i % 4] * 4) for i in range(60)]
    rows.append(confidence_row("nogold", answer=None, picks=[0] * 4))
    for i, row in enumerate(rows[:60]):
        row["unsafe_option"] = i % 2 if i % 3 else None  # carried to the held-out questions (guard metrics read it)
    pq.write_table(pa.Table.from_pylist(rows, schema=CONFIDENCE_SCHEMA), tmp_path / "confidence.parquet")
    counts = build_sft(str(tmp_path / "confidence.parquet"), str(tmp_path / "sft"), SFTConfig(val_fraction=0.3, include_variants=True))
    train = pq.read_table(tmp_path / "sft" / "train.parquet").to_pylist()
    val = pq.read_table(tmp_path / "sft" / "val.parquet").to_pylist()
    assert not {r["question_id"] for r in train} & {r["question_id"] for r in val}
    assert counts["skipped"] == {"no gold answer": 1}
    assert counts["questions"]["train"] + counts["questions"]["val"] == 60
    assert counts["examples"] == {"train": len(train), "val": len(val)} and len(train) + len(val) == 240
    for split, examples in (("train", train), ("val", val)):
        questions = pq.read_table(tmp_path / "sft" / f"{split}_questions.parquet").to_pylist()
        assert sorted(q["id"] for q in questions) == sorted({e["question_id"] for e in examples})
        for q in questions:
            i = int(q["id"][1:])
            assert q["unsafe_option"] == (i % 2 if i % 3 else None) and q["answer"] == i % 4


def test_the_sft_stage_builds_a_subsets_set_once_and_redoes_it_when_its_inputs_change(tmp_path):
    """safeconf.stages' sft stage (the experiment's learning curve and ablations): the SFT set of some questions of
    a finished pipeline run, from its confidence table; a rerun with the same inputs is skipped, other questions
    or other sft settings rebuild it, and a run whose pipeline never finished is refused."""
    from safeconf import io, stages
    from safeconf.config import load_config

    run, model = tmp_path / "run", tmp_path / "model"
    config = load_config(overrides=[f"out={model}", "sft.val_fraction=0.3"])
    with pytest.raises(stages.StageOrderError, match="pipeline stage has not finished"):
        stages.sft_plan(config, str(run), str(model), ["q1"])
    rows = [confidence_row(f"q{i}", answer=i % 4, picks=[i % 4] * 4) for i in range(40)]
    (run / "confidence").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CONFIDENCE_SCHEMA), run / "confidence" / "part-0.parquet")
    io.write_json(stages.marker_path(str(run), "pipeline"), {"fingerprint": "p1", "inputs": {}})
    half = [f"q{i}" for i in range(20)]

    first = stages.run_plan(stages.sft_plan(config, str(run), str(model), half), str(model))
    counts = stages.sft_counts(str(model))
    assert first["status"] == "ran" and sum(counts["questions"].values()) == 20
    built = {r["question_id"] for split in ("train", "val")
             for r in pq.read_table(model / "sft" / f"{split}.parquet").to_pylist()}
    assert built == set(half)
    assert stages.run_plan(stages.sft_plan(config, str(run), str(model), list(reversed(half))), str(model))["status"] == "up to date"
    again = stages.run_plan(stages.sft_plan(config, str(run), str(model), half + ["q20"]), str(model))
    assert again["status"] == "ran" and sum(stages.sft_counts(str(model))["questions"].values()) == 21
    targets = pq.read_table(model / "sft" / "train.parquet").column("target").to_pylist()
    assert all("Confidence" in t for t in targets)
    config.sft.confidence_format = "none"  # another setting (the no_confidence ablation)
    assert stages.run_plan(stages.sft_plan(config, str(run), str(model), half + ["q20"]), str(model))["status"] == "ran"
    targets = pq.read_table(model / "sft" / "train.parquet").column("target").to_pylist()
    assert not any("Confidence" in t for t in targets)


def test_build_sft_writes_few_large_row_groups_and_the_same_rows(tmp_path, monkeypatch):
    """The confidence table arrives a small file at a time; the SFT files gather its rows into row groups of about
    ROW_GROUP_BYTES (a Parquet writer holds every row group's metadata until it closes: one per small batch grew the
    driver ~100 MB at 1M questions), and hold the same rows in the same order as one row group a batch would."""
    from safeconf import sft

    rows = [confidence_row(f"q{i}", answer=i % 4, picks=[i % 4] * 4) for i in range(60)]
    table = tmp_path / "confidence"
    table.mkdir()
    for part in range(12):  # 12 files of 5 questions, as the pipeline writes a file per block
        pq.write_table(pa.Table.from_pylist(rows[part * 5:(part + 1) * 5], schema=CONFIDENCE_SCHEMA),
                       table / f"part-{part:02d}.parquet")
    def build(name: str, group_bytes: int) -> dict:
        monkeypatch.setattr(sft._RowGroupWriter, "ROW_GROUP_BYTES", group_bytes)
        build_sft(str(table), str(tmp_path / name), SFTConfig(val_fraction=0.3, include_variants=True))
        return {split: pq.ParquetFile(tmp_path / name / f"{split}.parquet")
                for split in ("train", "val", "train_questions", "val_questions")}

    each_batch = build("each-batch", 1)  # every batch its own row group, as before
    whole = build("whole", 10**9)
    quarter = build("quarter", pq.read_table(tmp_path / "each-batch" / "train.parquet").nbytes // 4)
    for name, file in each_batch.items():
        assert whole[name].read().to_pylist() == quarter[name].read().to_pylist() == file.read().to_pylist(), name
        assert whole[name].metadata.num_row_groups == 1, name
    assert each_batch["train"].metadata.num_row_groups == 12  # a row group a file before
    assert 3 <= quarter["train"].metadata.num_row_groups <= 5
