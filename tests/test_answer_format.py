"""Samples that can always be read (sampling.answer_format=label), prompts cut in the middle to fit the context,
and the pipeline's summary counts: on an Engine whose model is a known distribution over the option labels."""

from __future__ import annotations

import math
import re
from collections import Counter

import pyarrow as pa
import pytest

from safeconf import io
from safeconf.config import load_config
from safeconf.engines.base import (
    CUT_MARKER,
    Completion,
    Engine,
    draw_labels,
    label_distribution,
    label_rng,
)
from safeconf.mutations import original_variant
from safeconf.prompts import ANSWER_PREFIX
from safeconf.pipeline import EngineStage, confidence_batch, mutate_batch, summarise
from safeconf.prompts import labels_for, render_messages
from safeconf.schema import MUTATED_SCHEMA, QUESTION_SCHEMA


class SpaceTokenizer:
    """A transformers-like tokenizer where a token is one character, with the space before it if there is one:
    " A" is one token, " 10" is " 1" + "0" (so labels "1" and "10" share their first token)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _tokens(self, text: str):
        return list(re.finditer(r" ?[^ ]| ", text, re.DOTALL))

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(m.group(), len(self.vocab)) for m in self._tokens(text)]

    def decode(self, ids, skip_special_tokens=True):
        names = {i: t for t, i in self.vocab.items()}
        return "".join(names[i] for i in ids)

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        return {"input_ids": self.encode(text), "offset_mapping": [m.span() for m in self._tokens(text)]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class KnownEngine(Engine):
    """The engine interface over a known model: the reply's answer is label L with probability `label_probs[L]`
    (default: uniform over the prompt's labels), written as " L\\n" token by token; P(next token | what follows
    the answer prefix so far) is that distribution conditioned on the prefix of " L\\n" written so far, so the
    whole-label score of L is exactly log p(L) and, where first tokens differ, so is the first token's.
    Free-form replies are `reply`. `context` (when set) is the prompt limit in tokens, whatever max_new_tokens."""

    def __init__(self, label_probs=None, reply="I would rather not say.", context=None):
        self.tokenizer = SpaceTokenizer()
        self.label_probs = label_probs
        self.reply = reply
        self.context = context
        self.generated = []  # the prompts _generate received
        self.scored = 0  # contexts scored

    def prompt_limit(self, max_new_tokens):
        return self.context

    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop):
        self.generated += prompts
        return [[Completion(self.reply, self.tokenizer.encode(self.reply), None) for _ in range(n)] for _ in prompts]

    def _next_token_logprobs(self, contexts, targets):
        out = []
        for context, tokens in zip(contexts, targets):
            self.scored += 1
            text = self.tokenizer.decode(context)
            prefix = next(p for p in ANSWER_PREFIX.values() if p in text)
            user = text[text.rindex("<user>"): text.rindex("<assistant>")]
            labels = [line.split(".", 1)[0] for line in user.split("\n") if re.match(r"^\w+\. ", line)]
            probs = self.label_probs or {label: 1 / len(labels) for label in labels}
            written = text.rsplit(prefix, 1)[1]
            sep = " " if prefix.isascii() else ""
            live = {sep + label + "\n": p for label, p in probs.items() if (sep + label + "\n").startswith(written)}
            mass = sum(live.values())
            scores = []
            for token in tokens:
                after = written + self.tokenizer.decode([token])
                p = sum(q for w, q in live.items() if w.startswith(after)) / mass
                scores.append(math.log(p) if p > 0 else -1e9)
            out.append(scores)
        return out


def question(qid="q1", lang="en", options=("Safe", "Unsafe", "Not sure"), answer=1, text=None, task="mcq"):
    return {"id": qid, "source": "t", "lang": lang, "task": task, "category": None,
            "question": text or f"Which is right for {qid}?", "options": list(options), "answer": answer}


def config(*extra):
    return load_config(overrides=["mutation.operators=shuffle,relabel,framing", "mutation.variants_per_question=3",
                                  "sampling.k=4", *extra])


def stage(engine, *extra) -> EngineStage:
    return EngineStage(config(*extra).to_dict(), engine=engine)


def sampled(engine, questions, *extra) -> list[dict]:
    """The rows after mutation and the engine stage (LLM mutations + sampling)."""
    cfg = config(*extra)
    batch = mutate_batch(pa.Table.from_pylist(questions, schema=QUESTION_SCHEMA), cfg.mutation)
    return EngineStage(cfg.to_dict(), engine=engine)(batch).to_pylist()


# --- drawing the answer label ---------------------------------------------------------------------------


def test_label_distribution_temperature_and_nucleus():
    logprobs = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert label_distribution(logprobs, 1.0) == pytest.approx([0.5, 0.3, 0.2])
    sharp = [p**2 for p in (0.5, 0.3, 0.2)]
    assert label_distribution(logprobs, 0.5) == pytest.approx([p / sum(sharp) for p in sharp])
    assert label_distribution(logprobs, 1.0, top_p=0.7) == pytest.approx([0.625, 0.375, 0.0])  # A+B reach 0.7
    assert label_distribution(logprobs, 1.0, top_p=0.4) == pytest.approx([1.0, 0.0, 0.0])  # at least one label
    assert label_distribution(logprobs, 0.0) == [1.0, 0.0, 0.0]
    assert label_distribution(logprobs, 1e-4) == pytest.approx([1.0, 0.0, 0.0])  # temperature -> 0: the argmax
    assert label_distribution([-1.0, -1.0], 0.0) == [1.0, 0.0]  # ties: the first


def test_label_draws_follow_the_model_distribution_and_are_reproducible():
    probs = {"A": 0.5, "B": 0.3, "C": 0.2}
    engine = KnownEngine(probs)
    questions = [question(f"q{i}") for i in range(150)]
    rows = sampled(engine, questions, "mutation.variants_per_question=0", "sampling.temperature=1.0",
                   "sampling.top_p=1.0")
    variants = [v for r in rows for v in r["variants"]]
    draws = Counter(s["text"] for v in variants for s in v["samples"])
    total = sum(draws.values())
    assert total == 150 * 4 and set(draws) <= {"Answer: A", "Answer: B", "Answer: C"}
    for label, p in probs.items():  # 600 draws: 4 standard deviations is under 0.08
        assert draws[f"Answer: {label}"] / total == pytest.approx(p, abs=0.08)
    for v in variants:
        for s in v["samples"]:
            label = s["text"].split()[-1]
            assert v["labels"][s["choice"]] == label and s["choice_original"] == v["option_map"][s["choice"]]
            assert s["choice_logprob"] == pytest.approx(math.log(probs[label]))  # temperature 1, under the model
            assert s["verbal_confidence"] is None and s["num_tokens"] == 1
        assert v["answer_format"] == "label" and v["prompt_truncated"] is False  # no limit: never cut
    # The same seed and variant draw the same answers, whichever batch they are in; another seed differs.
    again = sampled(KnownEngine(probs), questions[::-1][:50], "mutation.variants_per_question=0",
                    "sampling.temperature=1.0", "sampling.top_p=1.0")
    first = {r["id"]: [s["choice"] for s in r["variants"][0]["samples"]] for r in rows}
    assert all(first[r["id"]] == [s["choice"] for s in r["variants"][0]["samples"]] for r in again)
    other = sampled(KnownEngine(probs), questions[:50], "mutation.variants_per_question=0", "sampling.seed=1",
                    "sampling.temperature=1.0", "sampling.top_p=1.0")
    assert any(first[r["id"]] != [s["choice"] for s in r["variants"][0]["samples"]] for r in other)


def test_draws_at_low_temperature_are_the_argmax_and_top_p_cuts_the_tail():
    rng = label_rng(0, "x#original")
    logprobs = [math.log(0.2), math.log(0.5), math.log(0.3)]
    assert draw_labels(logprobs, 50, 1e-3, 1.0, rng) == [1] * 50
    assert set(draw_labels(logprobs, 300, 1.0, 0.7, rng)) == {1, 2}  # the 0.2 label is outside the nucleus


def test_every_label_sample_is_an_answer_in_both_languages_and_all_label_styles():
    qs = [question("e1"), question("z1", lang="zh", options=("安全", "不安全")), question("e2", options=("a", "b"))]
    rows = sampled(KnownEngine(), qs, "mutation.variants_per_question=3")
    for row in rows:
        assert {v["mutation"] for v in row["variants"]} == {"original", "shuffle", "relabel", "framing"}
        for v in row["variants"]:
            prefix = ANSWER_PREFIX[v["lang"]]
            for s in v["samples"]:
                assert s["choice"] is not None and 0 <= s["choice"] < len(v["options"])
                assert s["text"] == (f"{prefix} " if v["lang"] == "en" else prefix) + v["labels"][s["choice"]]
    scored = confidence_batch(pa.Table.from_pylist(rows, schema=MUTATED_SCHEMA)).to_pylist()
    assert all(r["num_valid"] == r["num_samples"] > 0 for r in scored)


def test_labels_whose_first_tokens_collide_are_scored_whole():
    options = [f"option {i}" for i in range(1, 12)]  # 11 options: labels 1..11; "1", "10" and "11" share " 1"
    labels = labels_for("number", 11)
    probs = {label: (0.3 if label == "1" else 0.4 if label == "10" else 0.3 / 9) for label in labels}
    engine = KnownEngine(probs)
    variant = {**original_variant(question(options=options, answer=9)), "labels": labels}
    (scores,) = engine.label_scores([render_messages(variant)], ["Answer:"], [labels])
    assert scores.whole_label
    assert [math.exp(lp) for lp in scores.logprobs] == pytest.approx([probs[label] for label in labels])
    assert scores.num_tokens[0] == 2 and scores.num_tokens[9] == 3  # " 1" "\n"; " 1" "0" "\n"
    # The pipeline draws from that distribution and says how it was scored; "1" is never read as "10".
    stage_ = stage(engine, "sampling.k=400", "sampling.temperature=1.0", "sampling.top_p=1.0")
    stage_.sample([{"variants": [variant]}])
    counts = Counter(s["choice"] for s in variant["samples"])
    assert counts[0] / 400 == pytest.approx(0.3, abs=0.1) and counts[9] / 400 == pytest.approx(0.4, abs=0.1)
    assert variant["answer_format"] == "label-whole"
    assert {s["text"] for s in variant["samples"] if s["choice"] == 9} == {"Answer: 10"}
    # Distinct first tokens keep the one-token score.
    (plain,) = engine.label_scores([render_messages(original_variant(question()))], ["Answer:"], [["A", "B", "C"]])
    assert not plain.whole_label and plain.num_tokens == [1, 1, 1]


def test_option_logprobs_scores_colliding_labels_apart():
    labels = labels_for("number", 10)
    probs = {label: (0.5 if label == "10" else 0.5 / 9) for label in labels}
    variant = {**original_variant(question(options=[f"o{i}" for i in range(10)], answer=9)), "labels": labels}
    (logprobs,) = KnownEngine(probs).option_logprobs([render_messages(variant)], ["Answer:"], [labels])
    assert max(range(10), key=logprobs.__getitem__) == 9  # not "1", whose first token " 1" carries both


def test_free_format_is_kept_for_comparison():
    rows = sampled(KnownEngine(reply="Hmm, hard to say."), [question()], "sampling.answer_format=free")
    for v in rows[0]["variants"]:
        assert v["answer_format"] == "free" and len(v["samples"]) == 4
        assert all(s["choice"] is None and s["text"] == "Hmm, hard to say." for s in v["samples"])
    rows = sampled(KnownEngine(reply="Answer: B\nConfidence: 70%"), [question()], "sampling.answer_format=free")
    original = rows[0]["variants"][0]
    assert [(s["choice"], s["verbal_confidence"]) for s in original["samples"]] == [(1, 0.7)] * 4


def test_unknown_answer_format_is_refused():
    with pytest.raises(ValueError, match="sampling.answer_format"):
        config("sampling.answer_format=json").validate()


# --- prompts cut to fit ---------------------------------------------------------------------------------


LONG = "Context: " + " ".join(f"w{i}" for i in range(400)) + " END. Is the request above safe?"


def test_an_over_long_prompt_loses_the_middle_of_its_question_only():
    engine = KnownEngine(context=700)
    messages = render_messages(original_variant(question(text=LONG)))
    assert engine.prompt_tokens(messages) > 700 and not engine.prompt_fits(messages, 24)
    cut = engine.fit_prompt(messages, 24)
    assert engine.prompt_tokens(cut) <= 700 and engine.prompt_fits(cut, 24)
    assert cut[0] == messages[0]  # the system turn is untouched
    system, user = messages[0]["content"], messages[1]["content"]
    question_text, _, rest = user.partition("\n\nOptions:\n")
    new_question, _, new_rest = cut[1]["content"].partition("\n\nOptions:\n")
    assert new_rest == rest  # options and instruction whole
    head, _, tail = new_question.partition(CUT_MARKER)
    assert CUT_MARKER in new_question and head and tail
    assert question_text.startswith(head) and question_text.endswith(tail)  # its head and its tail are kept
    assert len(head) > 100 and len(tail) > 100  # from the middle, not from one end
    assert engine.fit_prompt(cut, 24) is cut  # a prompt that fits is left as it is
    # The engine cuts what it generates from, and the cut prompt is what it sees.
    engine.generate([messages], n=1, max_tokens=24)
    assert engine.generated == [cut]


def test_a_prompt_that_cannot_fit_is_an_error_not_a_silent_cut():
    engine = KnownEngine(context=20)
    with pytest.raises(ValueError, match="cannot be cut to 20 tokens"):
        engine.fit_prompt(render_messages(original_variant(question(text=LONG))), 24)


def test_truncation_is_recorded_per_variant_and_counted(tmp_path):
    short, long_ = question("short"), question("long", text=LONG)
    for fmt in ("label", "free"):
        rows = sampled(KnownEngine(context=700), [short, long_], f"sampling.answer_format={fmt}")
        cut = {r["id"]: {v["prompt_truncated"] for v in r["variants"]} for r in rows}
        assert cut == {"short": {False}, "long": {True}}
        out = io.join(str(tmp_path), fmt)
        io.write_table(out, confidence_batch(pa.Table.from_pylist(rows, schema=MUTATED_SCHEMA)))
        summary = summarise(out)
        assert summary["truncated_prompts"]["sampling"] == {"prompts": 8, "truncated": 4}
        assert summary["truncated_prompts"]["llm_mutations"] == {"prompts": 0, "truncated": 0}
        assert summary["unreadable_samples"] == (0 if fmt == "label" else 32)
        assert summary["unreadable_rate"] == (0.0 if fmt == "label" else 1.0)


# --- the summary's per-operator table -------------------------------------------------------------------


def test_summary_per_operator_table_reconciles(tmp_path):
    from safeconf.data.loaders import read_questions

    questions = [r.record for r in read_questions("embedded")][:12]
    cfg = config("mutation.operators=shuffle,polarity,paraphrase,translate,relabel,framing",
                 "mutation.variants_per_question=5")
    mutated = mutate_batch(pa.Table.from_pylist(questions, schema=QUESTION_SCHEMA), cfg.mutation).to_pylist()
    assigned = Counter()  # variant slots each operator was given, before any LLM ran
    for row in mutated:
        assigned.update(v["mutation"] for v in row["variants"] if v["mutation"] != "original")
        assigned.update(p.split(":", 1)[1] for p in row["pending_llm"])
        assigned.update(d["mutation"] for d in row["dropped"])
    llm_requests = sum(len(r["pending_llm"]) for r in mutated)
    engine = KnownEngine(reply="Sorry, I can't.", context=100000)  # every LLM variant comes back garbled
    rows = EngineStage(cfg.to_dict(), engine=engine)(pa.Table.from_pylist(mutated, schema=MUTATED_SCHEMA)).to_pylist()
    out = io.join(str(tmp_path), "confidence.parquet")
    io.write_table(out, confidence_batch(pa.Table.from_pylist(rows, schema=MUTATED_SCHEMA)))
    summary = summarise(out)
    table = summary["mutations"]
    assert {name: e["attempted"] for name, e in table.items()} == dict(assigned)
    for name, entry in table.items():
        assert entry["kept"] + entry["dropped"] == entry["attempted"]
        assert sum(entry["dropped_by_reason"].values()) == entry["dropped"]
        assert entry["kept"] == summary["variants_by_mutation"].get(name, 0)
    assert table["paraphrase"]["kept"] == 0 and table["paraphrase"]["dropped"] > 0  # the garbled replies
    assert summary["truncated_prompts"]["llm_mutations"] == {"prompts": llm_requests, "truncated": 0}
    assert summary["unreadable_samples"] == 0 and summary["samples"] == 4 * sum(len(r["variants"]) for r in rows)
