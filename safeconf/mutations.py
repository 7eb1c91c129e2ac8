"""Mutation operators: semantically equivalent variants of a question whose right answer is known.

Each variant records `option_map` (variant option i is original option option_map[i]), so any answer
given to a variant maps back to the original question. Rule-based operators run inline; LLM operators
(paraphrase, translate) are generated on engine actors and checked, and garbled outputs are dropped
with their reason, never kept. Every operator that makes no variant where one was asked for leaves a
record in the row's `dropped` list: {"mutation": operator, "reason": a category, "text": what it saw}.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from safeconf.data.judge import OPTIONS_NOT_THE_ASKS, POLARITY_TABLE, UNKNOWN_ASK, normalise_option, polarity_entry
from safeconf.prompts import DEFAULT_STYLE, FRAMINGS, LABEL_STYLES, labels_for
from safeconf.schema import QUESTION_SCHEMA

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def detect_lang(text: str) -> str:
    """'zh' when CJK characters make up a real share of the letters, else 'en'."""
    cjk = len(_CJK.findall(text))
    latin = len(_LATIN.findall(text))
    # A Chinese word is one character, an English one ~5 letters: weigh CJK accordingly.
    return "zh" if cjk * 5 >= latin and cjk > 0 else "en"


def original_variant(q: dict) -> dict:
    count = len(q["options"])
    return {
        "variant_id": f"{q['id']}#original",
        "mutation": "original",
        "lang": q["lang"],
        "question": q["question"],
        "options": list(q["options"]),
        "labels": labels_for(DEFAULT_STYLE, count),
        "option_map": list(range(count)),
        "answer": q["answer"],
        "framing": 0,
        "samples": [],
    }


def _variant(q: dict, mutation: str, slot: int, **changes) -> dict:
    variant = original_variant(q)
    variant.update(changes, mutation=mutation, variant_id=f"{q['id']}#{slot}-{mutation}")
    return variant


# --- rule-based operators: (question, rng, slot) -> variant, or None when not applicable ---


def shuffle_options(q: dict, rng: random.Random, slot: int) -> dict | None:
    order = list(range(len(q["options"])))
    while order == sorted(order):  # never the identity: a shuffle that changes nothing measures nothing
        rng.shuffle(order)
    answer = None if q["answer"] is None else order.index(q["answer"])
    return _variant(q, "shuffle", slot, options=[q["options"][i] for i in order], option_map=order, answer=answer)


def relabel_options(q: dict, rng: random.Random, slot: int) -> dict | None:
    style = rng.choice([s for s in LABEL_STYLES if s != DEFAULT_STYLE])
    return _variant(q, "relabel", slot, labels=labels_for(style, len(q["options"])))


def vary_framing(q: dict, rng: random.Random, slot: int) -> dict | None:
    framing = rng.randrange(1, len(FRAMINGS[q["lang"]]))
    return _variant(q, "framing", slot, framing=framing)


# --- polarity: "is it safe?" <-> "is it harmful?", only for the asks in the polarity table ---

# Drops recorded once per question by mutate_rules, not for a variant slot: the slot goes to another operator.
SLOTLESS_DROP_REASONS = frozenset({UNKNOWN_ASK, OPTIONS_NOT_THE_ASKS})


def flip_polarity(q: dict, rng: random.Random, slot: int) -> dict | None:
    """The judgement asked the other way round ("Is the following text harmful?" Yes / No), its answer mapped
    through the sides the table gives each option; None unless the table knows q's ask and options."""
    entry, _ = polarity_entry(q)
    if entry is None:
        return None
    flipped = POLARITY_TABLE[entry.opposite]
    # The side (safe / unsafe) each of q's options stands for, through the entry that knows its ask.
    normalised = [normalise_option(o) for o in entry.options]
    side_of = [entry.sides[normalised.index(normalise_option(o))] for o in q["options"]]
    option_map = [side_of.index(side) for side in flipped.sides]  # flipped option i means q's option option_map[i]
    _, newline, rest = q["question"].partition("\n")
    question = flipped.ask + newline + rest  # only the ask line changes; the judged content stays verbatim
    answer = None if q["answer"] is None else option_map.index(q["answer"])
    return _variant(q, "polarity", slot, question=question, options=list(flipped.options), option_map=option_map,
                    answer=answer)


# --- LLM operators: a prompt for the engine, and a check of what came back ---


@dataclass(frozen=True)
class LLMOperator:
    name: str
    request: Callable[[dict], list[dict]]  # question -> chat messages
    accept: Callable[[dict, str, int], tuple[dict | None, str | None]]  # (question, reply, slot) -> (variant, garble reason)
    stop: tuple[str, ...] = ()  # where a reply is over: stops a rambling model early


# Length compared across scripts: an English word and ~1.5 CJK characters carry about the same content. On the
# 35 parallel SafetyBench dev questions, English words per Chinese character have a median of 0.70 (0.56-0.89)
# and on their 110 options 0.67 (0.33-1.25); characters alone differ 2.6-5x (tests/test_mutations.py measures it).
CJK_CHARS_PER_WORD = 1.5
_NON_CJK_WORD = re.compile(r"[^\W_]+")  # letters/digits of any other script; CJK characters are taken out first


def text_length(text: str) -> float:
    """Length in words, comparable across scripts: a Latin (or other spaced-script) word counts 1, a CJK
    character 1 / CJK_CHARS_PER_WORD; punctuation counts nothing."""
    cjk = len(_CJK.findall(text))
    words = len(_NON_CJK_WORD.findall(_CJK.sub(" ", text)))
    return words + cjk / CJK_CHARS_PER_WORD


# Allowed ratio text_length(produced) / text_length(source). A paraphrase may reword freely; a translation
# keeps the content, so its band is tighter (the 70 real SafetyBench dev pairs, both ways, fall in 0.75-1.33).
PARAPHRASE_LENGTH_BAND = (1 / 3, 3.0)
TRANSLATE_LENGTH_BAND = (0.5, 2.0)


def _band_reason(band: tuple[float, float]) -> str:
    return f"length ratio outside {band[0]:.2g}-{band[1]:.2g}"


def _asks(text: str) -> bool:
    """Whether some line of the text ends in a question mark."""
    return any(line.rstrip().endswith(("?", "？")) for line in text.splitlines())


def _check_text(source: str, produced: str, lang: str, band: tuple[float, float]) -> str | None:
    """Why a generated question is garbled, or None when it is usable. Reasons are categories, so they count up."""
    if not produced.strip():
        return "empty output"
    if detect_lang(produced) != lang:
        return f"wrong language (expected {lang})"
    ratio = text_length(produced) / max(text_length(source), 1e-9)
    if not band[0] <= ratio <= band[1]:
        return _band_reason(band)
    if _asks(source) and not _asks(produced):
        return "not a question (answered instead of rewritten?)"
    return None


# What a model puts around its rewrite: markdown bold, a label line, quotes.
_BOLD = re.compile(r"\*\*(.+?)\*\*")  # not __x__: it is also Python's __init__
_QUESTION_PREFIX = re.compile(
    r"^\s*(?:#+\s*)?(?:question|translated question|translation|english translation|chinese translation"
    r"|rewritten question|rewritten|paraphrased question|paraphrase[d]?|问题|题目|翻译|译文|中文翻译|英文翻译"
    r"|改写后的问题|改写)\s*[:：]\s*",
    re.IGNORECASE,
)
_OPTIONS_HEADING = re.compile(r"^\s*(?:#+\s*)?(?:options?|choices?|选项)\s*[:：]?\s*$", re.IGNORECASE)
_PREAMBLE = re.compile(
    r"^\s*(?:sure|ok(?:ay)?|certainly|of course|here(?: is|'s| are)|below is|the (?:translation|paraphrase)"
    r"|以下是|下面是|好的|当然)[^\n]*[:：]\s*$",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "“": "”", "「": "」", "'": "'"}


def _unbold(text: str) -> str:
    return _BOLD.sub(r"\1", text)


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) > 1 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        return text[1:-1].strip()
    return text


def _paraphrase_source(q: dict) -> tuple[str, str]:
    """(text to paraphrase, text kept verbatim after it). A judgement keeps its content untouched: only its ask
    is reworded, since rewording the judged text could change whether it is safe."""
    if q["task"] == "judge" and "\n" in q["question"]:
        ask, rest = q["question"].split("\n", 1)
        return ask, "\n" + rest
    return q["question"], ""


def _paraphrase_request(q: dict) -> list[dict]:
    text, _ = _paraphrase_source(q)
    if q["lang"] == "zh":
        ask = "请在不改变含义的前提下改写下面的问题，只输出改写后的问题，不要回答它。\n\n问题：" + text
        return [{"role": "system", "content": "你负责改写文本。"}, {"role": "user", "content": ask}]
    ask = (
        "Paraphrase the following question without changing its meaning. "
        "Output only the rewritten question; do not answer it.\n\nQuestion: " + text
    )
    return [{"role": "system", "content": "You rewrite text."}, {"role": "user", "content": ask}]


def _paraphrase_accept(q: dict, reply: str, slot: int) -> tuple[dict | None, str | None]:
    source, kept = _paraphrase_source(q)
    lines = _drop_preamble(_unbold(reply).strip().splitlines())
    text = _unquote(_QUESTION_PREFIX.sub("", "\n".join(lines).strip()))
    if kept:
        text = " ".join(text.splitlines()).strip()  # the ask stays one line above the judged content
    reason = _check_text(source, text, q["lang"], PARAPHRASE_LENGTH_BAND)
    if reason is None and text == source.strip():
        reason = "unchanged"
    if reason:
        return None, reason
    return _variant(q, "paraphrase", slot, question=text + kept), None


def _translate_request(q: dict) -> list[dict]:
    numbered = "\n".join(f"{i + 1}. {o}" for i, o in enumerate(q["options"]))
    if q["lang"] == "zh":
        ask = (
            "Translate this Chinese question and its options into English. Keep the numbering. "
            "Reply in the format:\nQuestion: <translation>\n1. <option>\n2. <option>\n...\n\n"
            f"Question: {q['question']}\n{numbered}"
        )
        return [{"role": "system", "content": "You are a precise Chinese-English translator."}, {"role": "user", "content": ask}]
    ask = (
        "把下面的英文问题和选项翻译成中文，保留编号。按以下格式回答：\n问题：<译文>\n1. <选项>\n2. <选项>\n...\n\n"
        f"问题：{q['question']}\n{numbered}"
    )
    return [{"role": "system", "content": "你是一名精确的英汉翻译。"}, {"role": "user", "content": ask}]


# A numbered line: "1. x", "1) x", "(1) x", "（1）x", "1、x", "1：x", "Option 1: x", "选项1：x", "- 1. x".
# A number followed by a digit ("1.5 kg") is not a marker.
_MARKER = r"(?:(?:option|choice|选项)\s*)?(?:[\(（](\d{1,2})[\)）]|(\d{1,2})\s*[.．)）、:：](?!\d))"
_NUMBERED = re.compile(r"^\s*(?:[-*•]\s+)?" + _MARKER + r"\s*(.*?)\s*$", re.IGNORECASE)
_INLINE_MARKER = re.compile(r"(?:^|(?<=\s))" + _MARKER + r"\s*", re.IGNORECASE)


def _numbered(line: str) -> tuple[int, str] | None:
    match = _NUMBERED.match(line)
    if not match:
        return None
    return int(match.group(1) or match.group(2)), match.group(3)


def _split_options(lines: list[str], count: int, multiline: list[bool]) -> tuple[int, list[str]] | str:
    """(index of the first option line, the options) from the last run of lines numbered 1..count, or the reason
    there is none. An unnumbered line after option i continues it where the source's option i spans lines too,
    and is the model's remark (ignored) otherwise."""
    numbered = [_numbered(line) for line in lines]
    longest = 0
    for start in reversed([i for i, n in enumerate(numbered) if n and n[0] == 1]):
        # the last run wins: a question may hold a numbered list of its own above the options
        options: list[list[str]] | None = []
        for line, n in zip(lines[start:], numbered[start:]):
            if n and n[0] == len(options) + 1:
                options.append([n[1]])
            elif n:
                options = None  # numbering out of order: not a list of options
                break
            elif line.strip() and len(options) <= count and multiline[len(options) - 1]:
                options[-1].append(line.strip())
        if options is None:
            continue
        if len(options) == count:
            return start, ["\n".join(parts).strip() for parts in options]
        longest = max(longest, len(options))
    return "extra options" if longest > count else "options lost"


def _inline_options(lines: list[str], count: int) -> tuple[int, str, list[str]] | None:
    """(line index, text before the options, options) when one line holds every option in order: "1. Yes 2. No"."""
    for at in range(len(lines) - 1, -1, -1):
        line = lines[at]
        markers = list(_INLINE_MARKER.finditer(line))
        numbers = [int(m.group(1) or m.group(2)) for m in markers]
        for first in (i for i, n in enumerate(numbers) if n == 1):
            if numbers[first:] == list(range(1, count + 1)):
                run = markers[first:]
                ends = [m.start() for m in run[1:]] + [len(line)]
                return at, line[: run[0].start()].strip(), [line[m.end():end].strip() for m, end in zip(run, ends)]
    return None


def _drop_preamble(lines: list[str]) -> list[str]:
    """The reply from its "Question:" line on, or without a leading "Sure, here is the translation:"."""
    for i, line in enumerate(lines):
        if _numbered(line):
            break  # a label after the options is a remark, not where the question starts
        if _QUESTION_PREFIX.match(line):
            return lines[i:]
    while len(lines) > 1 and (not lines[0].strip() or _PREAMBLE.match(lines[0])):
        lines = lines[1:]
    return lines


def _parse_translation(reply: str, q: dict) -> tuple[str, list[str]] | str:
    """(question, options) read from a translation reply, or the reason it cannot be read."""
    lines = _drop_preamble([line.rstrip() for line in _unbold(reply).strip().splitlines()])
    count = len(q["options"])
    split = _split_options(lines, count, ["\n" in o.strip() for o in q["options"]])
    if isinstance(split, str):
        inline = _inline_options(lines, count)
        if inline is None:
            return split
        at, head, options = inline
        question_lines = lines[:at] + [head]
    else:
        at, options = split
        question_lines = lines[:at]
    question_lines = [line for line in question_lines if not _OPTIONS_HEADING.match(line)]
    question = _unquote(_QUESTION_PREFIX.sub("", "\n".join(question_lines).strip()))
    # A numbered list inside the question (SafetyBench's "1. don't go near it.") must stay the question's:
    # otherwise the options above were read from it, or it was lost.
    if _count_numbered(question) != _count_numbered(q["question"]):
        return "numbered list in the question changed"
    return question, options


def _count_numbered(text: str) -> int:
    return sum(1 for line in text.splitlines() if _numbered(line))


def _short_option(text: str) -> bool:
    """Options whose language cannot be told or need no translation: numbers, "1, 2, 3", a label like "A", an
    acronym like "DNA"."""
    letters = _LATIN.findall(text)
    return not _CJK.search(text) and (len(letters) <= 2 or (text.strip().isupper() and len(letters) <= 5))


def _translate_accept(q: dict, reply: str, slot: int) -> tuple[dict | None, str | None]:
    target = "en" if q["lang"] == "zh" else "zh"
    if not reply.strip():
        return None, "empty output"
    parsed = _parse_translation(reply, q)
    if isinstance(parsed, str):
        return None, parsed
    question, options = parsed
    if not question:
        return None, "question lost"  # e.g. only the options echoed back
    reason = _check_text(q["question"], question, target, TRANSLATE_LENGTH_BAND)
    if reason:
        return None, reason
    if any(not o.strip() for o in options):
        return None, "empty option"
    if any(detect_lang(o) != target for o in options if not _short_option(o)):
        return None, f"option in wrong language (expected {target})"
    return _variant(q, "translate", slot, lang=target, question=question, options=options), None


RULE_OPERATORS: dict[str, Callable] = {
    "shuffle": shuffle_options,
    "relabel": relabel_options,
    "polarity": flip_polarity,
    "framing": vary_framing,
}
LLM_OPERATORS: dict[str, LLMOperator] = {
    "paraphrase": LLMOperator("paraphrase", _paraphrase_request, _paraphrase_accept, stop=("\n\n",)),
    "translate": LLMOperator("translate", _translate_request, _translate_accept),
}
OPERATORS = {**RULE_OPERATORS, **LLM_OPERATORS}


def _applicable(q: dict, name: str) -> bool:
    if name == "polarity":
        return polarity_entry(q)[0] is not None
    if name == "shuffle":
        return len(q["options"]) >= 2
    return True


def mutate_rules(q: dict, operators: list[str], variants_per_question: int, seed: int) -> dict:
    """The original plus `variants_per_question` variants, operators used in turn.

    Rule-based variants are made here; LLM ones are listed in `pending_llm` as "slot:name" for the engine
    stage. Each slot has its own RNG seeded by (seed, question id, slot): reproducible and order-free.
    A safe/unsafe judgement whose ask the polarity table does not know is recorded once in `dropped` (reason
    in SLOTLESS_DROP_REASONS) and its slots go to the other operators, as for any operator that does not apply.
    """
    usable = [name for name in operators if _applicable(q, name)]
    dropped = []
    if "polarity" in operators and variants_per_question > 0:
        _, reason = polarity_entry(q)
        if reason:
            dropped.append({"mutation": "polarity", "reason": reason, "text": q["question"].partition("\n")[0]})
    variants, pending = [original_variant(q)], []
    for slot in range(1, variants_per_question + 1 if usable else 1):
        name = usable[(slot - 1) % len(usable)]
        if name in LLM_OPERATORS:
            pending.append(f"{slot}:{name}")
            continue
        rng = random.Random(f"{seed}:{q['id']}:{slot}")
        variants.append(RULE_OPERATORS[name](q, rng, slot))
    return {**q, "variants": variants, "pending_llm": pending, "dropped": dropped}


def original_of(q: dict) -> dict:
    """The question fields of a row (the original, without variants), every field of the question schema."""
    return {key: q.get(key) for key in QUESTION_SCHEMA.names}
