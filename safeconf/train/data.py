"""The SFT set on its way to the workers: validation on the driver, tokenization, the data plan, batches and loss.

The plan. The tokenized train set is put once in a seeded random order (the stream) and read by every worker in
windows of `world x per_step x train.group_window` rows, so a worker holds one window, never the whole set. Inside a
window the rows are permuted per (seed, epoch, window), dealt to the ranks, sorted by length so a micro-batch pads
little, cut into micro-batches and optimizer steps, and the steps shuffled. Everything is a function of
(seed, epoch, window, lengths): the same on every run, so a resumed run skips exactly the steps already taken.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from safeconf import io
from safeconf.schema import DataFormatError

SPLITS = ("train", "val")
IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there


# --- the SFT set, validated on the driver ---


def _message_problem(messages) -> str | None:
    """Why one row's `messages` cannot be trained on, or None."""
    if not messages:
        return "no messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {i} has no role"
        if not isinstance(message.get("content"), str):
            return f"message {i} ({message['role']}) has no text content"
    if messages[-1]["role"] != "assistant":
        return f"the last message is from {messages[-1]['role']!r}, not the assistant (the last message is the target)"
    if not messages[-1]["content"].strip():
        return "empty target (the assistant message is empty)"
    if len(messages) < 2:
        return "no prompt before the assistant target"
    return None


def read_sft_file(uri: str, max_errors: int = 10) -> pa.Table:
    """The `messages` column of one SFT Parquet file, with a `row` index. Bad rows stop the run with an error
    naming the file, the row and the column (before any worker starts)."""
    fs, path = io.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: SFT file not found (`safeconf pipeline` writes OUT/sft/train.parquet and val.parquet)")
    schema = pq.read_schema(path, filesystem=fs)
    if "messages" not in schema.names:
        raise DataFormatError(
            f"{uri}: no 'messages' column (columns: {', '.join(schema.names)}); an SFT set needs "
            "messages = list of {role, content} whose last message is the assistant target"
        )
    table = pq.read_table(path, filesystem=fs, columns=["messages"])
    problems = []
    for row, messages in enumerate(table.column("messages").to_pylist()):
        problem = _message_problem(messages)
        if problem:
            problems.append(f"{uri}: row {row}, column 'messages': {problem}")
    if problems:
        shown = problems[:max_errors] + ([f"... and {len(problems) - max_errors} more"] if len(problems) > max_errors else [])
        raise DataFormatError(f"{len(problems)} bad row(s) in the SFT set:\n  " + "\n  ".join(shown))
    return table.append_column("row", pa.array(np.arange(table.num_rows), pa.int64()))


# --- tokenization: the chat template, loss on the target only ---


@functools.lru_cache(maxsize=4)
def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def end_of_turn(tokenizer) -> str:
    """What the chat template writes after an assistant message (<|im_end|>, <|eot_id|>, ...), so the model learns
    to stop after the target. Falls back to the EOS token."""
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "SAFECONF_TARGET"}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template that refuses the probe: use EOS
        text = ""
    after = text.split("SAFECONF_TARGET", 1)[1].rstrip("\n") if "SAFECONF_TARGET" in text else ""
    return after or (tokenizer.eos_token or "")


def encode_example(tokenizer, messages: list[dict], eot: str) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens). The prompt is the chat template with the generation prompt, exactly
    what the judge sees at inference (the project's prompts carry their own system turn, so no template default
    is added); the target is the assistant text plus the end-of-turn token."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(messages[-1]["content"] + eot, add_special_tokens=False)["input_ids"]
    return list(prompt_ids) + list(target_ids), len(prompt_ids)


def tokenize_batch(batch: pa.Table, model_path: str, max_length: int) -> pa.Table:
    """Ray Data map: messages -> input_ids + prompt length; rows over max_length keep a skip reason instead."""
    tokenizer = load_tokenizer(model_path)
    eot = end_of_turn(tokenizer)
    ids_column, prompt_column, lengths, skips = [], [], [], []
    for messages in batch.column("messages").to_pylist():
        ids, prompt_tokens = encode_example(tokenizer, messages, eot)
        too_long = len(ids) > max_length
        ids_column.append([] if too_long else ids)
        prompt_column.append(prompt_tokens)
        lengths.append(len(ids))
        skips.append("too_long" if too_long else None)
    return pa.table(
        {
            "row": batch.column("row"),
            "input_ids": pa.array(ids_column, pa.list_(pa.int32())),
            "prompt_tokens": pa.array(prompt_column, pa.int32()),
            "num_tokens": pa.array(lengths, pa.int32()),
            "skip": pa.array(skips, pa.string()),
        }
    )


def _keep_unskipped(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.is_null(batch.column("skip"))).drop_columns(["skip"])


def stream_order(table: pa.Table, seed: int) -> pa.Table:
    """The split in the seeded order the workers stream it in (one shuffle of the whole set; windows do the rest)."""
    return table.take(np.random.default_rng([seed, 7]).permutation(table.num_rows))


def tokenize_split(table: pa.Table, model_path: str, max_length: int, rows_per_block: int = 2048):
    """(materialized Ray Dataset of the kept rows in stream order, with a `position` column 0..n-1; counts with the
    skipped rows and why). The table comes in stream order (stream_order)."""
    import ray

    blocks = [table.slice(i, rows_per_block) for i in range(0, max(table.num_rows, 1), rows_per_block)]
    tokenized = (
        ray.data.from_arrow(blocks)
        .map_batches(tokenize_batch, batch_format="pyarrow", batch_size=None,
                     fn_kwargs={"model_path": model_path, "max_length": max_length})
        .materialize()
    )
    skipped: dict[str, dict] = {}
    kept, tokens = 0, 0
    for batch in tokenized.select_columns(["row", "num_tokens", "skip"]).iter_batches(batch_format="pyarrow", batch_size=None):
        for row, num_tokens, skip in zip(*(batch.column(c).to_pylist() for c in ("row", "num_tokens", "skip"))):
            if skip is None:
                kept, tokens = kept + 1, tokens + num_tokens
                continue
            entry = skipped.setdefault(skip, {"count": 0, "rows": [], "num_tokens": [],
                                              "detail": f"longer than max_length={max_length} tokens: skipped, not cut"})
            entry["count"] += 1
            entry["rows"].append(row)
            entry["num_tokens"].append(num_tokens)
    for entry in skipped.values():  # the first rows in file order, to find them in the file
        first = sorted(zip(entry["rows"], entry["num_tokens"]))[:20]
        entry["rows"], entry["num_tokens"] = [r for r, _ in first], [n for _, n in first]
    # The kept rows, numbered in stream order: workers check the numbers arrive in order (the plan relies on it).
    # Materialized so the workers read finished blocks and need no Ray Data CPU (2-core deadlock).
    kept_batches = [_keep_unskipped(b) for b in tokenized.iter_batches(batch_format="pyarrow", batch_size=None)]
    kept_rows = pa.concat_tables(kept_batches or [_keep_unskipped(tokenize_batch(table.slice(0, 0), model_path, max_length))])
    kept_rows = kept_rows.append_column("position", pa.array(np.arange(kept_rows.num_rows), pa.int64()))
    dataset = ray.data.from_arrow([kept_rows.slice(i, rows_per_block)
                                   for i in range(0, max(kept_rows.num_rows, 1), rows_per_block)]).materialize()
    dataset.context.enable_progress_bars = False  # workers read finished blocks in a blink: no bars in the logs
    return dataset, {"rows": table.num_rows, "kept": kept, "tokens": tokens, "skipped": skipped}


# --- the plan: windows of the stream -> this rank's length-grouped optimizer steps ---


@dataclass(frozen=True)
class Plan:
    """How a split is cut into optimizer steps; the same numbers on every rank and every run."""

    world_size: int
    micro_batch_size: int
    accumulation: int
    group_window: int  # optimizer steps per window
    seed: int

    @property
    def per_step(self) -> int:  # examples of one rank in one optimizer step
        return self.micro_batch_size * self.accumulation

    @property
    def window_rows(self) -> int:  # rows of the stream in one window (every rank's steps of the window)
        return self.world_size * self.per_step * self.group_window

    def window_counts(self, rows: int) -> tuple[int, int]:
        """(optimizer steps, rows left out) of a window of `rows` rows. Every rank takes rows // world_size (equal
        step counts keep the ZeRO collectives in step); a last step shorter than a full one is kept when it still
        has at least one example per micro-batch."""
        per_rank = rows // self.world_size
        steps, rest = divmod(per_rank, self.per_step)
        if rest >= self.accumulation:
            steps, rest = steps + 1, 0
        return steps, rows - self.world_size * per_rank + self.world_size * rest

    def epoch_counts(self, rows: int) -> tuple[int, int]:
        """(optimizer steps per epoch, examples left out of each epoch) for a split of `rows` rows."""
        full, last = divmod(rows, self.window_rows)
        steps, left_out = self.window_counts(last) if last else (0, 0)
        return full * self.group_window + steps, left_out

    def window_steps(self, lengths: np.ndarray, rank: int, epoch: int, window: int,
                     group_by_length: bool = True) -> list[list[np.ndarray]]:
        """This rank's optimizer steps in one window: each step is `accumulation` arrays of row positions in the
        window (lengths = the window's example lengths, in stream order)."""
        rng = np.random.default_rng([self.seed, epoch, window])
        per_rank = len(lengths) // self.world_size
        steps, _ = self.window_counts(len(lengths))
        mine = rng.permutation(len(lengths))[rank * per_rank:(rank + 1) * per_rank]
        full = min(steps, per_rank // self.per_step)
        kept = mine[:full * self.per_step + (per_rank - full * self.per_step if steps > full else 0)]
        if group_by_length:  # neighbours in length share a micro-batch: little padding
            kept = kept[np.argsort(lengths[kept], kind="stable")]
        plan = [np.array_split(kept[s * self.per_step:(s + 1) * self.per_step], self.accumulation) for s in range(steps)]
        order = rng.permutation(len(plan)) if group_by_length else np.arange(len(plan))  # no long-steps-last bias
        return [plan[i] for i in order]


def stream_windows(shard, window_rows: int, skip_windows: int = 0):
    """The stream of a worker's dataset shard in windows of `window_rows` rows (the last one shorter), each an
    Examples; the first `skip_windows` windows are read past without being converted. Raises if Ray Data delivers
    rows out of stream order, which the plan relies on."""
    expected = 0
    for window, table in enumerate(shard.iter_batches(batch_size=window_rows, batch_format="pyarrow", drop_last=False)):
        positions = table.column("position").to_numpy()
        if positions[0] != expected or (len(positions) > 1 and np.any(np.diff(positions) != 1)):
            raise RuntimeError(f"SFT rows arrived out of order (window {window} starts at position {positions[0]}, "
                               f"expected {expected}): the data plan needs Ray Data's preserve_order")
        expected += len(positions)
        if window >= skip_windows:
            yield window, Examples.from_table(table)


@dataclass
class Examples:
    """Tokenized rows held by a worker: one window of the stream."""

    ids: list
    prompt_tokens: np.ndarray
    rows: np.ndarray  # row in the SFT file, for messages

    @classmethod
    def from_table(cls, table: pa.Table) -> "Examples":
        ids = [np.asarray(x, dtype=np.int64) for x in table.column("input_ids").to_pylist()]
        return cls(ids, table.column("prompt_tokens").to_numpy(), table.column("row").to_numpy())

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)


def collate(examples: Examples, positions, pad_token_id: int) -> dict:
    """Left-padded tensors: every target then ends at the last position, so the loss needs the logits of the last
    `keep` positions only (the LM head over the whole prompt is a fifth of a small model's compute). Position ids
    count from each row's first real token; labels are -100 on prompt and padding."""
    import torch

    seqs = [examples.ids[i] for i in positions]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for j, (seq, i) in enumerate(zip(seqs, positions)):
        start, prompt = width - len(seq), int(examples.prompt_tokens[i])
        input_ids[j, start:] = torch.from_numpy(seq)
        attention_mask[j, start:] = 1
        labels[j, start + prompt:] = input_ids[j, start + prompt:]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    keep = int((labels != IGNORE_INDEX).sum(1).max()) + 1  # the longest target and the position before it
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "labels": labels, "keep": keep}


def causal_lm_loss(model, batch: dict):
    """(mean next-token cross-entropy over the target tokens, number of target tokens): the loss transformers
    computes from `labels`, with the LM head run on the last `keep` positions only."""
    import torch.nn.functional as F

    keep = batch["keep"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], logits_to_keep=keep).logits
    targets = batch["labels"][:, -keep + 1:]  # the token each kept position but the last predicts
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)
    return loss, int((targets != IGNORE_INDEX).sum())
