"""Offline batch judging: every row of a question set or of a plain text log, judged with a run's calibrated
method and threshold by the endpoint's own judging code (serving.judging), streamed through Ray Data.

    safeconf judge --data SPEC --out DIR [--run RUN] [--text-column COL] [key=value ...]

- Reading: the driver lists the SPEC's files (names only, never rows: a directory or a glob becomes one read task
  per file; a public format's layout is one task). Each task reads its file on a worker with the project's
  loaders; a worker fetches an s3:// / gs:// file into its own cache. A malformed row is a reject with its file
  and line, and a file that cannot be read at all is one reject with its name: the other files go on.
- Validation runs on the workers. Rejects go from there to DIR/rejects/, one Parquet file per batch named by its
  content, so a retried batch rewrites its own file instead of adding a second.
- Judging: a pool of engine actors (engine.concurrency; MIN-MAX for an autoscaling pool) runs judge_batch and
  with_decision, so each row gets what /v1/judge answers for it: label, p_unsafe, tier, confidence, decision.
  Tier and label are null (counted as "none") for a multiple-choice question whose options have no safe/unsafe side.
- Output: DIR/judgements/*.parquet and DIR/summary.json (rows read = judged + rejected; counts per tier, label
  and reject reason).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import time

import pyarrow as pa
import pyarrow.fs as pafs

from safeconf import io
from safeconf.config import Config, config_from_dict
from safeconf.data.loaders import EMBEDDED, EXTENSIONS, FORMATS, URI, parse_spec, read_questions, read_texts
from safeconf.schema import REJECT_SCHEMA, validate_record

# One row read from a file, before validation: the record travels as JSON (records of a log differ in shape).
RAW_SCHEMA = pa.schema([pa.field("location", pa.string()), pa.field("record", pa.string()),
                        pa.field("error_field", pa.string()), pa.field("error_reason", pa.string()),
                        pa.field("raw", pa.string())])
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
PER_FILE_FORMATS = ("jsonl", "json", "parquet")  # one read task per file; other formats read their layout whole
ROWS_PER_BLOCK = 1000  # a read task yields blocks of this many rows, so a large file streams


# --- reading: file names on the driver, rows on the workers ---


def read_tasks(spec: str, text_column: str = "") -> list[str]:
    """The SPEC as one SPEC per read task. A path that does not exist fails here, before any actor starts."""
    if spec == EMBEDDED:
        return [spec]
    prefix, sep, rest = spec.partition(":")
    fmt, path = (prefix, rest) if sep and prefix in FORMATS and not URI.match(spec) else ("", spec)
    if fmt and fmt not in PER_FILE_FORMATS:
        if text_column:
            raise ValueError(f"--text-column reads .jsonl or Parquet files, not the {fmt!r} format")
        parse_spec(spec)  # fetches a remote file once and checks it is there
        return [spec]
    files = list_files(path)
    return [f"{fmt}:{file}" if fmt else file for file in files]


def list_files(path: str) -> list[str]:
    """A file, the .jsonl / .json / .parquet files of a folder, or the files a glob (*, ?, [..]) matches, local
    or on an object store; sorted. FileNotFoundError where nothing is there."""
    uri = io.normalise_uri(path)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    fs, where = io.filesystem(uri)
    wildcard = next((i for i, c in enumerate(where) if c in "*?["), None)
    if wildcard is not None:  # the folder above the first wildcard, searched recursively
        base = where[:wildcard].rsplit("/", 1)[0] or "/"
        found = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
                 if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, where)]
    else:
        info = fs.get_file_info(where)
        found = [where] if info.type == pafs.FileType.File else []
        if info.type == pafs.FileType.Directory:
            found = [i.path for i in fs.get_file_info(pafs.FileSelector(where))
                     if i.type == pafs.FileType.File and "." + i.path.rsplit(".", 1)[-1] in EXTENSIONS]
    if not found:
        raise FileNotFoundError(f"no data file at {path} (a .jsonl / .json / .parquet file, a folder of them, or a "
                                "glob)")
    return sorted(scheme + f if scheme else f for f in found)


def read_file(batch: dict, text_column: str = ""):
    """Ray Data flat read: the rows of each SPEC in the batch, as RAW_SCHEMA blocks of up to ROWS_PER_BLOCK."""
    for spec in batch["spec"]:
        rows = []
        try:
            if text_column:
                _, path = parse_spec(spec)  # fetches a remote file into this worker's cache
                records = read_texts(path, text_column)
            else:
                records = read_questions(spec)
            for raw in records:
                field, reason = raw.error or (None, None)
                rows.append({"location": raw.location, "record": None if raw.error else json.dumps(raw.record,
                             ensure_ascii=False, default=str), "error_field": field, "error_reason": reason,
                             "raw": raw.raw})
                if len(rows) == ROWS_PER_BLOCK:
                    yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                    rows = []
        except (ValueError, OSError) as error:  # the file as a whole: one reject naming it, the others go on
            rows.append({"location": spec, "record": None, "error_field": "file",
                         "error_reason": f"{type(error).__name__}: {error}", "raw": None})
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


# --- validation on the workers ---


def validate_batch(batch: pa.Table, text_column: str, rejects_uri: str) -> pa.Table:
    """The judgeable rows of a batch (ITEM_SCHEMA); its rejects are written to rejects_uri from here."""
    from safeconf.mutations import detect_lang

    items, rejects = [], []
    for row in batch.to_pylist():
        if row["record"] is None:
            rejects.append({"location": row["location"], "id": None, "field": row["error_field"],
                            "reason": row["error_reason"], "raw": row["raw"]})
            continue
        record = json.loads(row["record"])
        record_id = record.get("id") if isinstance(record.get("id"), str) else None
        if text_column:
            content = record.get(text_column)
            if not isinstance(content, str) or not content.strip():
                rejects.append({"location": row["location"], "id": record_id, "field": text_column,
                                "reason": "missing or empty text", "raw": row["raw"]})
                continue
            items.append({"id": record_id or row["location"], "location": row["location"], "kind": "text",
                          "lang": detect_lang(content), "content": content, "options": None,
                          "unsafe_option": None, "answer": None})
            continue
        clean, problem = validate_record(record, set())  # duplicate ids are judged like any row
        if problem:
            rejects.append({"location": row["location"], "id": record_id, "field": problem[0], "reason": problem[1],
                            "raw": row["raw"]})
            continue
        items.append({"id": clean["id"], "location": row["location"], "kind": "mcq", "lang": clean["lang"],
                      "content": clean["question"], "options": clean["options"],
                      "unsafe_option": clean["unsafe_option"], "answer": clean["answer"]})
    if rejects:
        table = pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)
        name = hashlib.sha256("\n".join(r["location"] for r in rejects).encode()).hexdigest()[:20]
        io.make_dirs(rejects_uri)
        io.write_table(io.join(rejects_uri, f"part-{name}.parquet"), table)
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
    import ray

    from safeconf.pipeline import map_on_engines

    tasks = read_tasks(spec, text_column)
    ds = ray.data.from_items([{"spec": t} for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(read_file, batch_size=1, fn_kwargs={"text_column": text_column})
    ds = ds.map_batches(validate_batch, batch_format="pyarrow",
                        fn_kwargs={"text_column": text_column, "rejects_uri": io.join(out, "rejects")})
    return map_on_engines(ds, stage_class or JudgeStage, config, placement, policy=policy)


def run_judge(config: Config, spec: str, out: str, text_column: str = "", stage_class=None) -> dict:
    """Judge every row of SPEC into OUT; returns the summary (also OUT/summary.json)."""
    from safeconf.pipeline import engine_actors, init_ray
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
        ds.write_parquet(io.join(out, "judgements"))
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
    judged = _count_values(io.join(out, "judgements"), ["tier", "label", "status"])
    rejected = _count_values(io.join(out, "rejects"), ["reason_key"])
    judged_rows, rejected_rows = sum(judged["status"].values()), sum(rejected["reason_key"].values())
    return {"read": judged_rows + rejected_rows, "judged": judged_rows, "rejected": rejected_rows,
            "tiers": judged["tier"], "labels": judged["label"], "status": judged["status"],
            "rejected_by_reason": dict(sorted(rejected["reason_key"].items(), key=lambda item: -item[1]))}


def _count_values(uri: str, columns: list[str]) -> dict[str, dict[str, int]]:
    """{column: {value: rows}} over a folder of Parquet files ("none" for a null: a multiple-choice question without
    a safe/unsafe side has no label or tier); reason_key is a reject's "field: reason"."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    counts: dict[str, dict[str, int]] = {column: {} for column in columns}
    if not io.exists(uri):
        return counts
    fs, path = io.filesystem(uri)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    for column in columns:
        if column == "reason_key":
            table = dataset.to_table(columns=["field", "reason"])
            values = pc.binary_join_element_wise(table["field"], table["reason"], ": ")
        else:
            values = dataset.to_table(columns=[column])[column]
        for entry in pc.value_counts(values).to_pylist():
            key = "none" if entry["values"] is None else str(entry["values"])
            counts[column][key] = counts[column].get(key, 0) + entry["counts"]
        counts[column] = dict(sorted(counts[column].items()))
    return counts
