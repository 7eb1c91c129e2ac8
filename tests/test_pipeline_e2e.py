"""The whole data pipeline on a local Ray with the real SmolLM2, over a handful of questions and two bad rows."""

import json

import pyarrow.parquet as pq
import pytest

from safeconf.config import load_config
from safeconf.data.loaders import read_questions
from safeconf.pipeline import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture
def questions_file(tmp_path):
    embedded = [r.record for r in read_questions("embedded")]
    picked = [next(q for q in embedded if q["lang"] == lang and q["task"] == task)
              for lang in ("en", "zh") for task in ("mcq", "judge")]
    bad = [{**picked[0], "id": "bad-answer", "answer": 9}, {**picked[1], "id": picked[1]["id"]}]  # out of range, duplicate
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in picked + bad), encoding="utf-8")
    return path


def test_pipeline_end_to_end_on_smollm2(local_ray, questions_file, tmp_path):
    out = tmp_path / "run"
    config = load_config(overrides=[
        f"data={questions_file}", f"out={out}", "engine.kind=hf", "engine.batch_size=2",
        "sampling.k=2", "sampling.max_tokens=16", "mutation.variants_per_question=4",
        "mutation.llm_max_tokens=48", "sft.val_fraction=0.5",
    ])
    summary = run_pipeline(config)

    assert summary["rows_read"] == 6 == summary["rows_accepted"] + summary["rows_rejected"]
    assert summary["rows_rejected"] == 2 and summary["rejected_by_field"] == {"answer": 1, "id": 1}
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert {r["reason"].split()[0] for r in rejects} == {"answer", "duplicate"}

    rows = pq.read_table(out / "confidence").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(json.loads(line)["id"] for line in questions_file.read_text().splitlines()[:4])
    for row in rows:
        made = len(row["variants"]) - 1 + len(row["dropped"])
        assert made == 4  # every variant slot is either a kept variant or a counted drop
        assert row["variants"][0]["mutation"] == "original"
        for variant in row["variants"]:
            assert len(variant["samples"]) == 2
            assert variant["prompt_truncated"] is False
            # SmolLM2 writes " 1" as " " + "1": number labels share a first token and are scored whole
            numbers = variant["labels"][0] == "1" and variant["lang"] == "en"
            assert variant["answer_format"] == ("label-whole" if numbers else "label")
            for s in variant["samples"]:  # the default answer format: every sample is an answer
                assert s["choice"] is not None and s["choice_original"] == variant["option_map"][s["choice"]]
                assert s["text"].endswith(variant["labels"][s["choice"]]) and s["choice_logprob"] < 0
        assert row["num_samples"] == 2 * len(row["variants"])
        assert row["confidence"] == pytest.approx(row["num_correct"] / row["num_samples"])
        assert 0 <= row["agreement"] <= 1
    assert summary["samples"] == sum(r["num_samples"] for r in rows)
    assert sum(summary["variants_by_mutation"].values()) == sum(len(r["variants"]) for r in rows)
    assert summary["answer_format"] == "label" and summary["unreadable_samples"] == 0
    variants = sum(len(r["variants"]) for r in rows)
    assert summary["truncated_prompts"]["sampling"] == {"prompts": variants, "truncated": 0}
    assert summary["truncated_prompts"]["llm_mutations"]["truncated"] == 0
    operators = summary["mutations"]
    assert sum(e["dropped"] for e in operators.values()) == sum(len(r["dropped"]) for r in rows)
    assert sum(e["kept"] for e in operators.values()) == sum(len(r["variants"]) - 1 for r in rows)
    assert all(e["kept"] + e["dropped"] == e["attempted"] for e in operators.values())
    assert sum(e["attempted"] for e in operators.values()) == 4 * len(rows)  # every slot attempted once

    train = pq.read_table(out / "sft" / "train.parquet").to_pylist()
    val = pq.read_table(out / "sft" / "val.parquet").to_pylist()
    # by default one example per question (sft.include_variants=false), on its original prompt
    assert len(train) + len(val) == sum(summary["sft"]["examples"].values()) == len(rows)
    assert all(e["mutation"] == "original" for e in train + val)
    assert all(e["messages"][-1]["role"] == "assistant" and e["messages"][-1]["content"] == e["target"] for e in train + val)
    assert json.loads((out / "summary.json").read_text())["rows_read"] == 6
