"""The confidence-labelled fine-tuning set: prompt -> "answer + confidence", split by original question id.

The ablations are settings of SFTConfig on the same confidence table: sft.confidence_format=none (the answer
alone, no confidence), sft.confidence_from=original (confidence from the original question's samples only),
sft.target=majority (the model's own majority answer, no gold labels)."""

from __future__ import annotations

import hashlib
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from safeconf import io
from safeconf.config import SFTConfig
from safeconf.confidence import question_confidence
from safeconf.mutations import original_of
from safeconf.prompts import format_target, render_messages
from safeconf.schema import QUESTION_SCHEMA

MESSAGE_TYPE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
SFT_SCHEMA = pa.schema(
    [
        pa.field("question_id", pa.string()),
        pa.field("variant_id", pa.string()),
        pa.field("mutation", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("task", pa.string()),
        pa.field("category", pa.string()),
        pa.field("messages", pa.list_(MESSAGE_TYPE)),  # system, user, assistant (the target)
        pa.field("target", pa.string()),
        pa.field("answer_label", pa.string()),
        pa.field("confidence", pa.float64()),  # the confidence the target states; null with confidence_format=none
    ]
)
SPLITS = ("train", "val")

log = logging.getLogger(__name__)


def split_of(question_id: str, val_fraction: float, seed: int = 0) -> str:
    """Deterministic split by question id: every variant of a question lands on the same side."""
    digest = hashlib.sha256(f"{seed}:{question_id}".encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def measured(row: dict, config: SFTConfig) -> dict:
    """The confidence row whose confidence, agreement and majority answer the targets state: the row itself
    (sft.confidence_from=all: over the original and its variants), or its original variant's samples alone
    (=original: the ablation without mutations, from the same samples)."""
    if config.confidence_from == "all":
        return row
    originals = [v for v in row["variants"] if v["mutation"] == "original"]
    if len(originals) != 1:
        raise ValueError(f"question {row['id']!r}: {len(originals)} variants with mutation 'original' (field "
                         "variants), need exactly one for sft.confidence_from=original")
    return question_confidence({**row, "variants": originals})


def sft_examples(row: dict, config: SFTConfig) -> tuple[list[dict], str | None]:
    """Examples of one question (original and, optionally, its variants), or the reason it has none."""
    scored = measured(row, config)
    if not scored["num_samples"]:
        return [], "no samples"
    if config.target == "gold":
        if row["answer"] is None:
            return [], "no gold answer"
        target_answer, confidence = row["answer"], scored["confidence"]
    else:
        if scored["majority_answer"] is None:
            return [], "no readable answer to take the majority of"
        target_answer, confidence = scored["majority_answer"], scored["agreement"]
    stated = None if config.confidence_format == "none" else confidence  # what the target says, for the table
    variants = row["variants"] if config.include_variants else row["variants"][:1]
    examples = []
    for variant in variants:
        label = variant["labels"][variant["option_map"].index(target_answer)]
        target = format_target(variant["lang"], label, stated, config.confidence_format)
        messages = render_messages(variant) + [{"role": "assistant", "content": target}]
        examples.append(
            {
                "question_id": row["id"],
                "variant_id": variant["variant_id"],
                "mutation": variant["mutation"],
                "lang": variant["lang"],
                "task": row["task"],
                "category": row["category"],
                "messages": messages,
                "target": target,
                "answer_label": label,
                "confidence": stated,
            }
        )
    return examples, None


class _RowGroupWriter:
    """A Parquet file written in row groups of about ROW_GROUP_BYTES. A ParquetWriter keeps every row group's metadata
    until it closes: one row group per confidence-table batch (256 questions) cost the driver ~100 MB at 1M questions
    (BENCHMARKS.md, "The pipeline workload"). Rows wait as Arrow tables, which hold their text compactly; by bytes, so
    long prompts wait in fewer rows."""

    ROW_GROUP_BYTES = 2 * 2**20  # a writer each for train, val and their questions: ~8 MB waiting at most

    def __init__(self, path: str, schema: pa.Schema, filesystem):
        self.schema = schema
        self.writer = pq.ParquetWriter(path, schema, filesystem=filesystem)
        self.waiting: list[pa.Table] = []
        self.waiting_bytes = 0

    def add(self, rows: list[dict]) -> None:
        if rows:
            self.waiting.append(pa.Table.from_pylist(rows, schema=self.schema))
            self.waiting_bytes += self.waiting[-1].nbytes
        if self.waiting_bytes >= self.ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.waiting:
            table = pa.concat_tables(self.waiting)
            self.writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.waiting, self.waiting_bytes = [], 0

    def close(self) -> None:
        try:
            self._flush()
        finally:
            self.writer.close()


def build_sft(confidence_uri: str, out_uri: str, config: SFTConfig, question_ids: set[str] | None = None) -> dict:
    """Stream the confidence table into `out_uri/{train,val}.parquet` (chat examples) and
    `out_uri/{train,val}_questions.parquet` (their original questions); return the counts. `question_ids`: build
    from those questions only (a subset of one pipeline run, e.g. a learning curve's smaller training sets)."""
    question_ids = None if question_ids is None else set(question_ids)
    io.make_dirs(out_uri)
    out_fs, out_path = io.filesystem(out_uri)
    writers = {(split, kind): _RowGroupWriter(f"{out_path}/{split}{suffix}.parquet", schema, out_fs)
               for split in SPLITS for kind, suffix, schema in (("examples", "", SFT_SCHEMA),
                                                                ("questions", "_questions", QUESTION_SCHEMA))}
    # ^ the original questions of each split too, in the question schema: the held-out set to evaluate on.
    counts = {"questions": {s: 0 for s in SPLITS}, "examples": {s: 0 for s in SPLITS}, "skipped": {}}
    found = set()
    try:
        for batch in io.iter_batches(confidence_uri):
            rows = {key: [] for key in writers}
            for row in batch.to_pylist():
                if question_ids is not None:
                    if row["id"] not in question_ids:
                        continue
                    found.add(row["id"])
                examples, skipped = sft_examples(row, config)
                if skipped:
                    counts["skipped"][skipped] = counts["skipped"].get(skipped, 0) + 1
                    continue
                split = split_of(row["id"], config.val_fraction, config.seed)
                rows[split, "examples"] += examples
                rows[split, "questions"].append(original_of(row))
                counts["questions"][split] += 1
                counts["examples"][split] += len(examples)
            for key, writer in writers.items():
                writer.add(rows[key])
    finally:
        for writer in writers.values():
            writer.close()
    if question_ids is not None and found != question_ids:
        missing = sorted(question_ids - found)
        raise ValueError(f"{len(missing)} question ids asked for are not in {confidence_uri} (field id), e.g. "
                         f"{missing[:5]}")
    for split in SPLITS:
        if counts["examples"][split] == 0:  # a small set split by hash can leave a side empty; training then refuses
            log.warning("the %s split of %s is empty (%d questions, sft.val_fraction=%s): use more questions or "
                        "another sft.val_fraction / sft.seed", split, out_uri, sum(counts["questions"].values()),
                        config.val_fraction)
    return counts
