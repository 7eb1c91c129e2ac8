"""Guard-tuning: give the model safety knowledge before SafeConf calibrates it.

SafeConf calibrates what a model knows. A model at chance on the task (the embedded 135M model) makes every
confidence method collapse to the base rate, so, as a guard team starts from a guard model, this stage first
teaches the model the task: plain supervised fine-tuning on the gold answers of a large labelled pool (guard.data),
no confidence in the target, then the LoRA merged into the weights. The merged folder (OUT/guard/merged) is the
model every later stage uses: sampling, the baselines, SafeConf's own fine-tune, evaluation and serving.

    guard.data -> validate (rejects to OUT/guard/rejects.parquet) -> leave out questions that are calibration
    (data) or held-out (eval.data) questions -> OUT/guard/sft/{train,val}.parquet (original prompt -> "Answer: X")
    -> Ray Train (safeconf.train, guard.* settings) -> OUT/guard/{adapter, merged, snapshots/, train_summary.json}
"""

from __future__ import annotations

import copy
import logging
from collections import Counter

import pyarrow as pa

from safeconf import io
from safeconf.config import Config
from safeconf.mutations import RULE_OPERATORS, mutate_rules, original_of, original_variant
from safeconf.prompts import format_target, render_messages
from safeconf.schema import QUESTION_SCHEMA
from safeconf.sft import SFT_SCHEMA, SPLITS, split_of

log = logging.getLogger(__name__)

GUARD_DIR = "guard"


def guard_dir(out: str) -> str:
    return io.join(out, GUARD_DIR)


def guard_model(out: str) -> str:
    """The guard-tuned model of run directory `out` (a merged HF folder)."""
    return io.join(guard_dir(out), "merged")


def guard_train_config(config: Config) -> Config:
    """The config the guard-tuning trains with: the train section's settings, with guard.* in place of the
    learning rate, epochs, steps, LoRA shape and snapshots, always merged, under its own Ray Train run name."""
    tuned = copy.deepcopy(config)
    guard, train = config.guard, tuned.train
    train.learning_rate = guard.learning_rate
    train.epochs = guard.epochs
    train.max_steps = guard.max_steps
    train.lora_rank = guard.lora_rank
    train.lora_alpha = 2 * guard.lora_rank
    train.lora_target_modules = list(guard.lora_target_modules)
    train.snapshot_steps = [int(s) for s in guard.snapshot_steps]
    train.merge = True
    train.run_name = f"{config.train.run_name}-guard"
    return tuned


def text_key(question: dict) -> tuple:
    return (question["question"], tuple(question["options"]))


def excluded_texts(config: Config) -> set[tuple]:
    """The texts the pool must not share: the calibration questions (data) and the held-out ones (eval.data)."""
    from safeconf.data.ingest import ingest

    texts = set()
    for spec in (config.data, config.eval.data):
        if spec:
            questions, _, _ = ingest(spec, config.limit)
            texts.update(text_key(q) for q in questions.to_pylist())
    return texts


def gold_examples(question: dict, config: Config) -> list[dict]:
    """SFT rows of one pool question, each a prompt -> its gold answer line, no confidence: the original prompt (as
    the judge sees it) and, with guard.variants, that many rule variants of it, the gold answer in each variant's
    own options and labels."""
    variants = [original_variant(question)]
    if config.guard.variants:
        operators = [name for name in config.mutation.operators if name in RULE_OPERATORS] or list(RULE_OPERATORS)
        variants = mutate_rules(question, operators, config.guard.variants, config.mutation.seed)["variants"]
    rows = []
    for variant in variants:
        label = variant["labels"][variant["answer"]]
        target = format_target(variant["lang"], label, None, "none")
        rows.append({
            "question_id": question["id"], "variant_id": variant["variant_id"], "mutation": variant["mutation"],
            "lang": variant["lang"], "task": question["task"], "category": question["category"],
            "messages": render_messages(variant) + [{"role": "assistant", "content": target}],
            "target": target, "answer_label": label, "confidence": None,
        })
    return rows


def balance_of(question: dict) -> str:
    """safe / unsafe for a judgement whose unsafe option is known, else the right option's position (a SafetyBench
    Yes / No judgement's unsafe answer is Yes or No by its ask, so not the index)."""
    if question["task"] == "judge" and question.get("unsafe_option") is not None:
        return "unsafe" if question["answer"] == question["unsafe_option"] else "safe"
    return f"answer {question['answer']}"


def build_guard_sft(config: Config, out: str) -> dict:
    """Read and validate guard.data, leave out questions without a gold answer or shared with the calibration and
    held-out sets (counted with the reason), and write OUT/guard/sft/{train,val}.parquet and
    {train,val}_questions.parquet; return the counts (read = accepted + rejected; accepted = used + left out)."""
    from safeconf.data.ingest import ingest

    questions, rejects, read = ingest(config.guard.data, config.guard.limit)
    sft = io.join(guard_dir(out), "sft")
    if rejects.num_rows:
        io.write_table(io.join(guard_dir(out), "rejects.parquet"), rejects)
    excluded = excluded_texts(config)
    rows = {split: [] for split in SPLITS}
    originals = {split: [] for split in SPLITS}
    left_out, balance = Counter(), {split: Counter() for split in SPLITS}
    for question in questions.to_pylist():
        if question["answer"] is None:
            left_out["no gold answer"] += 1
            continue
        if text_key(question) in excluded:
            left_out["also a calibration or held-out question"] += 1
            continue
        split = split_of(question["id"], config.guard.val_fraction, config.sft.seed)
        rows[split] += gold_examples(question, config)
        originals[split].append(original_of(question))
        balance[split][f"{question['source']}/{balance_of(question)}"] += 1
    if not rows["train"]:
        raise ValueError(f"guard.data={config.guard.data!r}: no usable question ({read} read, {rejects.num_rows} "
                         f"rejected, left out: {dict(left_out)})")
    for split in SPLITS:
        io.write_table(io.join(sft, f"{split}.parquet"), pa.Table.from_pylist(rows[split], schema=SFT_SCHEMA))
        io.write_table(io.join(sft, f"{split}_questions.parquet"),
                       pa.Table.from_pylist(originals[split], schema=QUESTION_SCHEMA))
    counts = {"read": read, "accepted": questions.num_rows, "rejected": rejects.num_rows,
              "left_out": dict(left_out), "examples": {s: len(rows[s]) for s in SPLITS},
              "examples_by_variant": dict(Counter(r["mutation"] for s in SPLITS for r in rows[s])),
              "balance": {s: dict(sorted(balance[s].items())) for s in SPLITS}}
    log.info("guard pool: %s", counts)
    return counts


def run_guard(config: Config, out: str, run_key: str = "", fresh: bool = False) -> dict:
    """The guard stage: the pool's SFT set, then Ray Train on it (resumable like the train stage), merged into
    OUT/guard/merged; returns the pool counts and the training summary."""
    from safeconf.train import run_training

    counts = build_guard_sft(config, out)
    summary = run_training(guard_train_config(config), io.join(guard_dir(out), "sft"), guard_dir(out),
                           run_key=run_key, fresh=fresh)
    result = {"pool": counts, "train": {k: v for k, v in summary.items() if k != "config"},
              "model": guard_model(out)}
    io.write_json(io.join(guard_dir(out), "guard_summary.json"), result)
    return result
