"""The one question schema, the Arrow types of every pipeline stage, and validation at the door.

A question row is kept whole from mutation to confidence: its variants (and their samples) are
list columns, so every stage is a pure per-row map and no shuffle is needed.
"""

from __future__ import annotations

import pyarrow as pa

from safeconf.data.judge import infer_unsafe_option

LANGS = ("en", "zh")
TASKS = ("mcq", "judge")
MAX_OPTIONS = 26  # option labels go up to Z

QUESTION_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("lang", pa.string()),
    pa.field("task", pa.string()),
    pa.field("category", pa.string()),
    pa.field("question", pa.string()),
    pa.field("options", pa.list_(pa.string())),
    pa.field("answer", pa.int64()),  # index into options; null when unknown
    # A safe/unsafe judgement: the index of the option that means unsafe (the positive class of guard metrics:
    # F1, AUPRC, P(unsafe)). Null for multiple choice and for judgements of another kind. Variants do not store
    # it: their option_map gives it (variant_unsafe_option).
    pa.field("unsafe_option", pa.int64()),
]
QUESTION_SCHEMA = pa.schema(QUESTION_FIELDS)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("location", pa.string()),  # "file:line" or "file:row"
        pa.field("id", pa.string()),
        pa.field("field", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("raw", pa.string()),  # the row as read, JSON-encoded where possible
    ]
)

SAMPLE_TYPE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("choice", pa.int64()),  # option index in the variant's order; null if unparseable
        pa.field("choice_original", pa.int64()),  # the same option in the original question's order
        pa.field("verbal_confidence", pa.float64()),  # stated confidence in [0, 1], null if absent
        pa.field("choice_logprob", pa.float64()),  # log-prob of the answer-label token, if the engine gives it
        pa.field("num_tokens", pa.int64()),
    ]
)

VARIANT_TYPE = pa.struct(
    [
        pa.field("variant_id", pa.string()),
        pa.field("mutation", pa.string()),  # "original", "shuffle", "relabel", ...
        pa.field("lang", pa.string()),
        pa.field("question", pa.string()),
        pa.field("options", pa.list_(pa.string())),
        pa.field("labels", pa.list_(pa.string())),  # how options are labelled in the prompt (A/B/C, 1/2/3, ...)
        pa.field("option_map", pa.list_(pa.int64())),  # variant option i is original option option_map[i]
        pa.field("answer", pa.int64()),  # right option in the variant's order; null when unknown
        pa.field("framing", pa.int64()),  # index of the system prompt / framing template
        pa.field("samples", pa.list_(SAMPLE_TYPE)),
        # How the samples were drawn: "label" (the answer label drawn from the model's distribution over the
        # labels), "label-whole" (the same, each label scored as its whole token sequence because their first
        # tokens collide, e.g. "1" and "10") or "free" (free-form replies, parsed). Null until sampled.
        pa.field("answer_format", pa.string()),
        pa.field("prompt_truncated", pa.bool_()),  # its sampling prompt was cut to fit the context
    ]
)

DROPPED_TYPE = pa.struct([pa.field("mutation", pa.string()), pa.field("reason", pa.string()), pa.field("text", pa.string())])

MUTATED_FIELDS = QUESTION_FIELDS + [
    pa.field("variants", pa.list_(VARIANT_TYPE)),
    pa.field("pending_llm", pa.list_(pa.string())),  # LLM mutations still to generate
    pa.field("dropped", pa.list_(DROPPED_TYPE)),  # garbled LLM variants, with the reason
    # LLM mutation requests of this question cut to fit the context; null: the engine cannot tell
    pa.field("llm_prompts_truncated", pa.int64()),
    pa.field("sampled_on", pa.string()),  # the Ray node id of the engine actor that sampled it; null outside Ray
]
MUTATED_SCHEMA = pa.schema(MUTATED_FIELDS)

MUTATION_STATS_TYPE = pa.struct(
    [
        pa.field("mutation", pa.string()),
        pa.field("samples", pa.int64()),
        pa.field("valid", pa.int64()),
        pa.field("correct", pa.int64()),
        pa.field("accuracy", pa.float64()),
        pa.field("agreement", pa.float64()),
    ]
)

CONFIDENCE_SCHEMA = pa.schema(
    MUTATED_FIELDS
    + [
        pa.field("num_samples", pa.int64()),
        pa.field("num_valid", pa.int64()),
        pa.field("num_correct", pa.int64()),
        pa.field("confidence", pa.float64()),  # share of right answers over variants x samples
        pa.field("majority_answer", pa.int64()),  # in the original option order
        pa.field("agreement", pa.float64()),  # share of samples that agree with the majority answer
        pa.field("verbal_confidence_mean", pa.float64()),
        pa.field("per_mutation", pa.list_(MUTATION_STATS_TYPE)),
    ]
)


class DataFormatError(ValueError):
    """A file that cannot be read at all; the message names the file and, where known, the line."""


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _check_text(value, field: str) -> str | None:
    """Return a reason when the value is not usable text."""
    if _is_blank(value):
        return f"{field} is missing or empty"
    if not isinstance(value, str):
        return f"{field} must be a string, got {type(value).__name__}"
    if "\ufffd" in value:
        return f"{field} holds undecodable text (U+FFFD replacement characters)"
    return None


def variant_unsafe_option(unsafe_option: int | None, option_map: list[int]) -> int | None:
    """The unsafe option in a variant's order (variant option i is original option option_map[i])."""
    return None if unsafe_option is None else option_map.index(unsafe_option)


def _options_problem(options) -> str | None:
    if not isinstance(options, (list, tuple)):
        return "options must be a list of strings"
    if len(options) < 2:
        return f"needs at least 2 options, got {len(options)}"
    if len(options) > MAX_OPTIONS:
        return f"at most {MAX_OPTIONS} options, got {len(options)}"
    return next((reason for i, option in enumerate(options) if (reason := _check_text(option, f"options[{i}]"))),
                None)


def _unsafe_option(record: dict, task: str, options: list) -> tuple[int | None, str | None]:
    """(the unsafe option's index, None) or (None, why it is refused): given, or inferred for a judgement."""
    unsafe = record.get("unsafe_option")
    if unsafe is None:
        return (infer_unsafe_option(record["question"], [str(o) for o in options]) if task == "judge" else None), None
    if isinstance(unsafe, float) and unsafe.is_integer():
        unsafe = int(unsafe)
    if isinstance(unsafe, bool) or not isinstance(unsafe, int) or not 0 <= unsafe < len(options):
        return None, f"unsafe_option must be an option index below {len(options)} or null, got {unsafe!r}"
    if task != "judge":
        return None, "only a judgement (task 'judge') has an unsafe option"
    return unsafe, None


def validate_record(record: dict, seen_ids: set[str]) -> tuple[dict | None, tuple[str, str] | None]:
    """Check one raw record against the schema.

    Returns (clean_row, None) when it is accepted, (None, (field, reason)) when it is rejected.
    `seen_ids` collects accepted ids so a duplicate is rejected (the first occurrence wins).
    """
    if not isinstance(record, dict):
        return None, ("row", f"expected an object, got {type(record).__name__}")
    for field in ("id", "source", "question"):
        reason = _check_text(record.get(field), field)
        if reason:
            return None, (field, reason)
    row_id = record["id"].strip()
    lang = record.get("lang")
    if lang not in LANGS:
        return None, ("lang", f"unknown language {lang!r}; expected one of {', '.join(LANGS)}")
    task = record.get("task")
    if task not in TASKS:
        return None, ("task", f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    category = record.get("category")
    if category is not None and not isinstance(category, str):
        return None, ("category", f"category must be a string or null, got {type(category).__name__}")
    options = record.get("options")
    problem = _options_problem(options)
    if problem:
        return None, ("options", problem)
    answer = record.get("answer")
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, int):
            if isinstance(answer, float) and answer.is_integer():
                answer = int(answer)
            else:
                return None, ("answer", f"answer must be an integer option index or null, got {answer!r}")
        if not 0 <= answer < len(options):
            return None, ("answer", f"answer index {answer} out of range for {len(options)} options")
    unsafe, problem = _unsafe_option(record, task, options)
    if problem:
        return None, ("unsafe_option", problem)
    if row_id in seen_ids:
        return None, ("id", f"duplicate id {row_id!r}")
    seen_ids.add(row_id)
    clean = {
        "id": row_id,
        "source": record["source"],
        "lang": lang,
        "task": task,
        "category": category,
        "question": record["question"],
        "options": [str(o) for o in options],
        "answer": answer,
        "unsafe_option": unsafe,
    }
    return clean, None
