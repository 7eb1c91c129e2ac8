"""Questions read and validated on the driver, for the sets a driver holds anyway (the evaluation's held-out
questions, the guard pool, the experiment's draws). The pipeline and `safeconf judge` stream theirs instead
(safeconf.data.stream), with the same validation."""

from __future__ import annotations

import json

import pyarrow as pa

from safeconf.data.loaders import read_questions
from safeconf.data.stream import reject
from safeconf.schema import QUESTION_SCHEMA, REJECT_SCHEMA, validate_record


def ingest(spec: str, limit: int = 0) -> tuple[pa.Table, pa.Table, int]:
    """(accepted questions, rejects with their reasons, rows read), on the driver: for the sets a driver holds
    anyway (the evaluation's held-out questions, the guard pool, the experiment's draws); the pipeline streams its
    questions instead (safeconf.data.stream). Rows read = accepted + rejected; the same validation."""
    accepted, rejected, seen, read = [], [], set(), 0
    for raw in read_questions(spec, limit=limit or None):
        read += 1
        if raw.error is not None:
            rejected.append(reject(raw.location, *raw.error, raw.raw))
            continue
        row, problem = validate_record(raw.record, seen)
        if problem is None:
            accepted.append(row)
            continue
        record_id = raw.record.get("id") if isinstance(raw.record, dict) else None
        rejected.append(reject(raw.location, *problem,
                               raw.raw or json.dumps(raw.record, ensure_ascii=False, default=str)[:2000], record_id))
    return (
        pa.Table.from_pylist(accepted, schema=QUESTION_SCHEMA),
        pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA),
        read,
    )
