"""Offline batch judging: every row of a question set or of a plain text log, judged with a run's calibrated
method and threshold by the endpoint's own judging code (serving.judging), streamed through Ray Data.

    safeconf judge --data SPEC --out DIR [--run RUN] [--text-column COL] [key=value ...]

- Reading and validation: safeconf.data.stream, as for the pipeline (file names on the driver, rows read and
  validated on the workers, rejects streamed to DIR/rejects/ with their location, field and reason), except that
  a repeated id is judged like any row. With --text-column, any .jsonl or Parquet log: the column's text is judged.
- Judging: a pool of engine actors (engine.concurrency; MIN-MAX for an autoscaling pool) runs judge_batch and
  with_decision, so each row gets what /v1/judge answers for it: label, p_unsafe, tier, confidence, decision.
  Tier and label are null (counted as "none") for a multiple-choice question whose options have no safe/unsafe side.
- Output: DIR/judgements/*.parquet and DIR/summary.json (rows read = judged + rejected; counts per tier, label
  and reject reason).
"""

from __future__ import annotations

import json
import time

import pyarrow as pa

from safeconf import io
from safeconf.config import Config, config_from_dict
from safeconf.data.stream import count_values, raw_rows, read_tasks, reject, validate_questions, write_rejects

# A validated row, as the judging actors take it.
ITEM_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("location", pa.string()),
                         pa.field("kind", pa.string()), pa.field("lang", pa.string()),
                         pa.field("content", pa.string()), pa.field("options", pa.list_(pa.string())),
                         pa.field("unsafe_option", pa.int64()), pa.field("answer", pa.int64())])
JUDGEMENT_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("location", pa.string()),
                              pa.field("kind", pa.string()), pa.field("lang", pa.string()),
                              pa.field("label", pa.string()), pa.field("p_unsafe", pa.float64()),
                              pa.field("tier", pa.string()), pa.field("confidence", pa.float64()),
                              pa.field("decision", pa.string()), pa.field("answer_index", pa.int64()),
                              pa.field("answer", pa.int64()), pa.field("status", pa.string()),
                              pa.field("method", pa.string()), pa.field("threshold", pa.float64())])


# --- validation on the workers (reading: safeconf.data.stream) ---


def validate_batch(batch: pa.Table, text_column: str, rejects_uri: str) -> pa.Table:
    """The judgeable rows of a RAW_SCHEMA batch (ITEM_SCHEMA); its rejects are written to rejects_uri from here.
    Questions are validated as the pipeline validates them, except that a repeated id is judged like any row."""
    if not text_column:
        questions = validate_questions(batch, rejects_uri)
        return pa.Table.from_pylist([{"id": q["id"], "location": q["location"], "kind": "mcq", "lang": q["lang"],
                                      "content": q["question"], "options": q["options"],
                                      "unsafe_option": q["unsafe_option"], "answer": q["answer"]}
                                     for q in questions.to_pylist()], schema=ITEM_SCHEMA)
    from safeconf.mutations import detect_lang

    items, rejects = [], []
    for row in batch.to_pylist():
        if row["record"] is None:
            rejects.append(reject(row["location"], row["error_field"], row["error_reason"], row["raw"]))
            continue
        record = json.loads(row["record"])
        content = record.get(text_column)
        if not isinstance(content, str) or not content.strip():
            rejects.append(reject(row["location"], text_column, "missing or empty text", row["raw"], record.get("id")))
            continue
        record_id = record.get("id") if isinstance(record.get("id"), str) else None
        items.append({"id": record_id or row["location"], "location": row["location"], "kind": "text",
                      "lang": detect_lang(content), "content": content, "options": None,
                      "unsafe_option": None, "answer": None})
    write_rejects(rejects, rejects_uri)
    return pa.Table.from_pylist(items, schema=ITEM_SCHEMA)


# --- judging on the engine actors ---


class JudgeStage:
    """A Ray Data actor holding one engine: the endpoint's judgement of each row (serving.judging)."""

    def __init__(self, config: dict, policy: dict, engine=None):
        import ray

        from safeconf.engines import make_engine
        from safeconf.evaluation.methods import JudgeSettings

        self.config = config_from_dict(config)
        self.engine = engine or make_engine(self.config.model, self.config.engine, seed=self.config.sampling.seed)
        self.method, self.threshold = policy["method"], policy["threshold"]
        judging = policy["judging"]
        self.settings = JudgeSettings(**{**judging, "stop": tuple(judging["stop"]),
                                         "content_free": tuple(judging["content_free"])})
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from safeconf.serving.judging import JudgeItem, judge_batch, text_item, with_decision

        rows = batch.to_pylist()
        items = [JudgeItem("mcq", r["lang"], r["content"], r["options"], r["unsafe_option"]) if r["kind"] == "mcq"
                 else text_item(r["lang"], "text", r["content"]) for r in rows]
        out = []
        for row, answer in zip(rows, judge_batch(self.engine, items, self.method, self.settings)):
            judged = with_decision(answer, self.threshold)
            out.append({**{k: row[k] for k in ("id", "location", "kind", "lang", "answer")},
                        **{k: judged[k] for k in ("label", "p_unsafe", "tier", "confidence", "decision",
                                                  "answer_index", "status", "method", "threshold")}})
        return pa.Table.from_pylist(out, schema=JUDGEMENT_SCHEMA)


def judge_dataset(config: Config, spec: str, out: str, policy: dict, text_column: str = "",
                  placement=None, stage_class=None):
    """The lazy Ray Dataset from the SPEC's files to judgement rows (read tasks listed now). `stage_class`:
    JudgeStage or a subclass (benchmarks/pipeline_scale.py gives it a stand-in engine)."""
    from safeconf.ray_utils import map_on_engines

    ds = raw_rows(read_tasks(spec, text_column), text_column).map_batches(
        validate_batch, batch_format="pyarrow",
        fn_kwargs={"text_column": text_column, "rejects_uri": io.join(out, "rejects")})
    # engine-batch-sized blocks: the actors share a file's rows instead of one taking its whole block
    ds = ds.repartition(target_num_rows_per_block=config.engine.batch_size)
    return map_on_engines(ds, stage_class or JudgeStage, config, placement, policy=policy)


def run_judge(config: Config, spec: str, out: str, text_column: str = "", stage_class=None) -> dict:
    """Judge every row of SPEC into OUT; returns the summary (also OUT/summary.json)."""
    from safeconf.ray_utils import LIGHT_TASK_CPUS, engine_actors, init_ray
    from safeconf.serving.judging import resolve_policy

    out = io.normalise_uri(out)
    for part in ("judgements", "rejects"):  # a rerun replaces the last one's shards
        if io.exists(io.join(out, part)):
            io.delete(io.join(out, part))
    policy = resolve_policy(config)
    policy_dict = policy.user_config()
    init_ray(config.ray_address)
    started = time.perf_counter()
    with engine_actors(config.engine) as placement:
        ds = judge_dataset(config, spec, out, policy_dict, text_column, placement, stage_class)
        ds.write_parquet(io.join(out, "judgements"), ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})
    summary = summarise(out)
    summary.update({"data": spec, "text_column": text_column or None, "method": policy.method,
                    "threshold": policy.threshold, "threshold_source": policy.source, "guarantee": policy.guarantee,
                    "model": config.model.name, "adapter": config.model.adapter or None,
                    "seconds": round(time.perf_counter() - started, 1)})
    io.write_json(io.join(out, "summary.json"), summary)
    return summary


def summarise(out: str) -> dict:
    """Counts over what the run wrote: rows read = judged + rejected, per tier, label and reject reason. Counted by
    Arrow, one column at a time, so a run of millions of rows costs the driver its distinct values only."""
    judged = count_values(io.join(out, "judgements"), ["tier", "label", "status"])
    rejected = count_values(io.join(out, "rejects"), ["reason_key"])
    judged_rows, rejected_rows = sum(judged["status"].values()), sum(rejected["reason_key"].values())
    return {"read": judged_rows + rejected_rows, "judged": judged_rows, "rejected": rejected_rows,
            "tiers": judged["tier"], "labels": judged["label"], "status": judged["status"],
            "rejected_by_reason": dict(sorted(rejected["reason_key"].items(), key=lambda item: -item[1]))}
