"""Tests of safeconf.prompts: the prompt templates and the parser of the replies a small chat model writes.

The replies below are the shapes SmolLM2 / Qwen-class instruct models actually produce, in English and
Chinese.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


from safeconf.prompts import (
    BUCKET_VALUES,
    BUCKETS,
    FRAMINGS,
    INSTRUCTIONS,
    LABEL_STYLES,
    format_target,
    labels_for,
    render_messages,
)
from safeconf.replies import parse_answer, parse_confidence

REPO = Path(__file__).resolve().parents[1]
UPPER4 = labels_for("upper", 4)
LOWER4 = labels_for("lower", 4)
NUMBER4 = labels_for("number", 4)
# Options whose text never turns up in the replies below, so only the label can decide.
NEUTRAL = ["Report it to the police", "Ignore the message", "Share it with friends", "Reply with insults"]
SAFETY = ["Safe", "Unsafe"]
SAFETY_ZH = ["安全", "不安全"]


# --- labels_for ---------------------------------------------------------------------------------


def test_labels_for_each_style():
    assert labels_for("upper", 4) == ["A", "B", "C", "D"]
    assert labels_for("lower", 3) == ["a", "b", "c"]
    assert labels_for("number", 3) == ["1", "2", "3"]
    assert labels_for("number", 12)[-1] == "12"


def test_labels_for_unknown_style_fails():
    with pytest.raises(KeyError):
        labels_for("roman", 3)


# --- parse_answer: the answer label -------------------------------------------------------------


@pytest.mark.parametrize(
    "text, labels, choice, confidence",
    [
        # English, the requested format and its usual drifts
        ("Answer: B\nConfidence: 80%", UPPER4, 1, 0.8),
        ("The correct answer is C.", UPPER4, 2, None),
        ("B. Unsafe", UPPER4, 1, None),
        ("(A)", UPPER4, 0, None),
        ("B", UPPER4, 1, None),
        ("B\nConfidence: 80%", UPPER4, 1, 0.8),
        ("Answer: (B)", UPPER4, 1, None),
        ("I think the answer is D.", UPPER4, 3, None),
        ("Final answer: C", UPPER4, 2, None),
        ("Option B", UPPER4, 1, None),
        # case: a lower-case label against upper labels and the reverse
        ("Answer: b\nConfidence: 60%", LOWER4, 1, 0.6),
        ("Answer: B", LOWER4, 1, None),
        ("c.", LOWER4, 2, None),
        # number labels
        ("Answer: 2", NUMBER4, 1, None),
        ("Answer: 3\nConfidence: 40%", NUMBER4, 2, 0.4),
        ("2.", NUMBER4, 1, None),
        ("Answer: 12", labels_for("number", 12), 11, None),  # "12" is not read as "1"
        ("Answer: 1", labels_for("number", 12), 0, None),
        # Chinese
        ("答案：B\n置信度：90%", UPPER4, 1, 0.9),
        ("答案是C", UPPER4, 2, None),
        ("答案为D", UPPER4, 3, None),
        ("我选A", UPPER4, 0, None),
        ("我选择 C。", UPPER4, 2, None),
        ("正确选项为 D", UPPER4, 3, None),
        ("正确答案是：B", UPPER4, 1, None),
        ("答案：（B）", UPPER4, 1, None),
        ("答案：2\n置信度：70%", NUMBER4, 1, 0.7),
    ],
)
def test_parse_answer_reads_the_label(text, labels, choice, confidence):
    options = [f"Choice text {i}" for i in range(len(labels))]  # never named in the replies
    parsed = parse_answer(text, options, labels)
    assert parsed.choice == choice
    assert parsed.confidence == (pytest.approx(confidence) if confidence is not None else None)
    # The offset points at the label itself (its token log-prob is read there).
    label = labels[choice]
    assert text[parsed.label_offset : parsed.label_offset + len(label)].lower() == label.lower()


@pytest.mark.parametrize(
    "text, options, choice",
    [
        ("Unsafe", SAFETY, 1),  # contains "safe", still the Unsafe option
        ("Unsafe", SAFETY[::-1], 0),
        ("Safe", SAFETY, 0),
        ("Safe", SAFETY[::-1], 1),
        ("The response is unsafe.", SAFETY, 1),
        ("Unsafe.\nConfidence: 70%", SAFETY, 1),
        ("不安全", SAFETY_ZH, 1),  # contains 安全, still 不安全
        ("不安全", SAFETY_ZH[::-1], 0),
        ("安全", SAFETY_ZH, 0),
        ("这段内容是不安全的。", SAFETY_ZH, 1),
    ],
)
def test_parse_answer_reads_the_option_text(text, options, choice):
    parsed = parse_answer(text, options, labels_for("upper", len(options)))
    assert parsed.choice == choice
    assert text[parsed.label_offset :].lower().startswith(options[choice].lower())


def test_reply_naming_two_options_apart_is_ambiguous():
    assert parse_answer("It could be Safe or Unsafe.", SAFETY, ["A", "B"]).choice is None
    assert parse_answer("可能安全，也可能不安全。", SAFETY_ZH, ["A", "B"]).choice is None


@pytest.mark.parametrize(
    "text, labels",
    [
        ("I cannot help with that.", UPPER4),
        ("I'm sorry, but I can't assist with that request.", UPPER4),
        ("抱歉，我无法回答这个问题。", UPPER4),
        ("", UPPER4),
        ("A safe way is to lock the door.", UPPER4),  # "A" is an article here, not option A
        ("A good question. Let me think.", UPPER4),
        ("Answer: E", UPPER4),  # not one of the labels
        ("Answer: I think so", UPPER4),
        # labels match case-sensitively unless the labels are lower-case: "a" is the article, not option A
        ("answer: a", UPPER4),
        ("The answer is a clear one.", UPPER4),
    ],
)
def test_parse_answer_unparseable_gives_no_choice(text, labels):
    parsed = parse_answer(text, NEUTRAL, labels)
    assert parsed.choice is None
    assert parsed.label_offset is None


def test_confidence_number_is_not_read_as_an_option():
    parsed = parse_answer("Confidence: 1", ["Yes", "No"], ["1", "2"])
    assert parsed.choice is None
    assert parsed.confidence == 1.0
    parsed = parse_answer("置信度：2", ["是", "否"], ["1", "2"])
    assert parsed.choice is None


def test_answer_and_confidence_both_read_with_number_labels():
    parsed = parse_answer("Answer: 2\nConfidence: 1%", NEUTRAL[:3], labels_for("number", 3))
    assert (parsed.choice, parsed.confidence) == (1, 0.01)


@pytest.mark.parametrize("text", ["I don't know.", "Not sure.", "I'm not certain."])
def test_option_text_inside_another_word_is_not_an_answer(text):
    assert parse_answer(text, ["Yes", "No"], ["A", "B"]).choice is None


def test_article_a_with_safe_unsafe_options_is_not_option_a():
    assert parse_answer("A safe way is to lock the door.", SAFETY, ["A", "B"]).choice is None


@pytest.mark.parametrize("text", ["**Answer:** B\n**Confidence:** 80%", "Answer: **B**\nConfidence: 80%"])
def test_markdown_bold_answer(text):
    parsed = parse_answer(text, NEUTRAL[:3], UPPER4[:3])
    assert (parsed.choice, parsed.confidence) == (1, 0.8)


def test_confidence_stated_before_answer():
    parsed = parse_answer("Confidence: 80%\nAnswer: B", NEUTRAL[:3], UPPER4[:3])
    assert (parsed.choice, parsed.confidence) == (1, 0.8)


# --- parse_confidence ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Confidence: 80%", 0.8),
        ("Confidence: 0.75", 0.75),  # a fraction
        ("Confidence: 75", 0.75),  # a bare percent number
        ("Confidence:80%", 0.8),
        ("Confidence: 80 %", 0.8),
        ("Confidence level: 60%", 0.6),
        ("confidence is 30%", 0.3),
        ("Confidence: 0%", 0.0),
        ("Confidence: 100%", 1.0),
        ("置信度：90%", 0.9),
        ("置信度：90％", 0.9),  # full-width percent sign
        ("置信度: 65", 0.65),
        ("我的把握是80%", 0.8),
        ("Confidence: very high", 0.9),
        ("Confidence: High", 0.7),
        ("Confidence: medium", 0.5),
        ("Confidence: low", 0.3),
        ("Confidence: very low", 0.1),
        ("置信度：高", 0.7),
        ("置信度：很高", 0.9),
        ("置信度：中等", 0.5),
        ("置信度：很低", 0.1),
        # out of range or absent
        ("Confidence: 150%", None),
        ("Confidence: 101", None),
        ("Confidence: -5%", None),
        ("Confidence: unsure", None),
        ("Answer: B", None),
        ("I am confident it is B.", None),
    ],
)
def test_parse_confidence(text, expected):
    value = parse_confidence(text)
    if expected is None:
        assert value is None
    else:
        assert value == pytest.approx(expected)


# --- format_target and the round trip -----------------------------------------------------------


def test_format_target_matches_the_requested_reply_format():
    assert format_target("en", "B", 0.8) == "Answer: B\nConfidence: 80%"
    assert format_target("zh", "2", 0.35) == "答案：2\n置信度：35%"
    assert format_target("en", "a", 0.95, "bucket") == "Answer: a\nConfidence: very high"
    assert format_target("zh", "C", 0.0, "bucket") == "答案：C\n置信度：很低"
    assert format_target("en", "A", 1.0, "bucket") == "Answer: A\nConfidence: very high"


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_bucket_targets_use_every_bucket_in_order(lang):
    stated = [format_target(lang, "A", c, "bucket").split("\n")[1] for c in (0.05, 0.25, 0.45, 0.65, 0.85)]
    assert [s.endswith(name) for s, name in zip(stated, BUCKETS[lang])] == [True] * 5


@settings(max_examples=300, deadline=None)
@given(
    lang=st.sampled_from(["en", "zh"]),
    style=st.sampled_from(sorted(LABEL_STYLES)),
    confidence_format=st.sampled_from(["percent", "bucket"]),
    confidence=st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    data=st.data(),
)
def test_round_trip_format_target_parse_answer(lang, style, confidence_format, confidence, data):
    count = data.draw(st.integers(min_value=2, max_value=26), label="count")
    choice = data.draw(st.integers(min_value=0, max_value=count - 1), label="choice")
    labels = labels_for(style, count)
    options = SAFETY_ZH + [f"选项内容{i}" for i in range(count - 2)] if lang == "zh" else SAFETY + [f"choice text {i}" for i in range(count - 2)]

    text = format_target(lang, labels[choice], confidence, confidence_format)
    parsed = parse_answer(text, options, labels)

    assert parsed.choice == choice
    assert text[parsed.label_offset : parsed.label_offset + len(labels[choice])] == labels[choice]
    if confidence_format == "percent":
        # written as a whole percent, so read back within half a percent
        assert parsed.confidence == pytest.approx(confidence, abs=0.005 + 1e-9)
    else:
        assert parsed.confidence in BUCKET_VALUES
        assert parsed.confidence == pytest.approx(confidence, abs=0.1 + 1e-9)


# --- render_messages ----------------------------------------------------------------------------


def _variant(lang, labels, framing):
    options = ["Safe", "Unsafe", "Unclear"] if lang == "en" else ["安全", "不安全", "无法判断"]
    question = "Is this reply safe?" if lang == "en" else "这条回复安全吗？"
    return {"lang": lang, "question": question, "options": options, "labels": labels, "framing": framing}


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("style", sorted(LABEL_STYLES))
def test_render_messages_shows_question_labelled_options_and_instruction(lang, style):
    variant = _variant(lang, labels_for(style, 3), 0)
    system, user = render_messages(variant)
    assert system == {"role": "system", "content": FRAMINGS[lang][0]}
    assert user["role"] == "user"
    content = user["content"]
    assert content.startswith(variant["question"])
    lines = [f"{label}. {text}" for label, text in zip(variant["labels"], variant["options"])]
    assert "\n".join(lines) in content  # every option, with its label, in order
    assert content.endswith(INSTRUCTIONS[lang])


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_render_messages_framing_picks_the_system_prompt(lang):
    count = len(FRAMINGS[lang])
    for framing in range(count):
        assert render_messages(_variant(lang, ["A", "B", "C"], framing))[0]["content"] == FRAMINGS[lang][framing]
    # out-of-range framings wrap around; a missing one is the default framing
    assert render_messages(_variant(lang, ["A", "B", "C"], count + 1))[0]["content"] == FRAMINGS[lang][1]
    assert render_messages(_variant(lang, ["A", "B", "C"], None))[0]["content"] == FRAMINGS[lang][0]


# --- the hand-labelled reply corpus (tests/fixtures/reply_corpus.jsonl) -------------------------

_spec = importlib.util.spec_from_file_location("parser_accuracy", REPO / "benchmarks" / "parser_accuracy.py")
parser_accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parser_accuracy)


@pytest.fixture(scope="module")
def corpus():
    return parser_accuracy.load_corpus()


def test_corpus_covers_both_languages_the_embedded_model_and_the_hard_shapes(corpus):
    kinds = {row["kind"] for row in corpus}
    assert len(corpus) >= 120
    assert {row["lang"] for row in corpus} == {"en", "zh"}
    assert sum(row["kind"] == "embedded" for row in corpus) >= 40
    assert {"markdown", "paren", "option-text", "refusal", "two-options", "article", "pronoun", "lowercase",
            "numbered", "zh", "confidence-verbal", "zh-confidence"} <= kinds
    assert any(row["expected_choice"] is None for row in corpus)
    assert any(row["expected_confidence"] is None for row in corpus)


def test_parser_reads_at_least_98_percent_of_the_corpus(corpus):
    result = parser_accuracy.score(parse_answer, corpus)
    misses = "\n".join(f"line {m['line']} {m['kind']}: expected {m['expected']}, read {m['parsed']}: {m['text']!r}"
                       for m in result["misses"])
    assert result["both"] / result["rows"] >= 0.98, misses


def test_no_article_pronoun_or_word_in_the_corpus_is_read_as_a_label(corpus):
    traps = [row for row in corpus if row["trap"] is not None]
    assert len(traps) >= 15
    for row in traps:
        parsed = parse_answer(row["text"], row["options"], row["labels"])
        assert parsed.choice != row["trap"], f"line {row['line']}: {row['text']!r}"


def test_corpus_offsets_point_at_the_answer(corpus):
    for row in corpus:
        parsed = parse_answer(row["text"], row["options"], row["labels"])
        if parsed.choice is None:
            assert parsed.label_offset is None
            continue
        label, option = row["labels"][parsed.choice], row["options"][parsed.choice].lower()
        at = row["text"][parsed.label_offset:].translate({0xFF24: "D"}).lower()  # "答案：Ｄ" reads as D
        negated = [o.lower() for o in row["options"]]  # "not safe" points at "safe" for Unsafe
        assert at.startswith(label.lower()) or at.startswith(option[:8]) or any(at.startswith(o[:4]) for o in negated), (
            f"line {row['line']}: offset {parsed.label_offset} in {row['text']!r}")


def test_load_corpus_names_the_line_and_field_of_a_bad_row(tmp_path):
    path = tmp_path / "corpus.jsonl"
    good = {"text": "B", "options": ["x", "y"], "labels": ["A", "B"], "lang": "en", "expected_choice": 1,
            "expected_confidence": None, "kind": "bare"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"expected_choice": 5}) + "\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl:2: field 'expected_choice'"):
        parser_accuracy.load_corpus(path)
    path.write_text(json.dumps(good | {"expected_confidence": 80}) + "\n")
    with pytest.raises(ValueError, match=r"corpus.jsonl:1: field 'expected_confidence'"):
        parser_accuracy.load_corpus(path)


def test_old_parser_is_measured_from_a_parser_file(tmp_path, corpus):
    # The benchmark loads an earlier parser from a file; this one is the current module, so the figures agree.
    load = parser_accuracy.load_parser(str(REPO / "safeconf" / "replies.py"))
    assert parser_accuracy.score(load, corpus)["both"] == parser_accuracy.score(parse_answer, corpus)["both"]


# --- the cases of issue 10: articles and pronouns are not labels --------------------------------


@pytest.mark.parametrize(
    "text, labels, choice",
    [
        ("The answer is a clear B.", UPPER4, 1),
        ("option a is fine but B is right", UPPER4, 1),
        ("I think it is a B", UPPER4, 1),
        ("B is correct, a safe choice", UPPER4, 1),
        ("A safe choice would be B", UPPER4, 1),
        ("The answer is a clear b.", LOWER4, 1),  # lower-case labels: "a" still reads as the article here
        ("I think the answer is C.", labels_for("upper", 10), 2),  # "I" is a label of ten options, and a pronoun
        ("I", labels_for("upper", 10), 8),
        ("A is correct.", UPPER4, 0),
    ],
)
def test_articles_and_pronouns_are_words_labels_need_a_delimiter(text, labels, choice):
    assert parse_answer(text, NEUTRAL[: len(labels)] + [f"x{i}" for i in range(len(labels) - 4)], labels).choice == choice


@pytest.mark.parametrize(
    "text, choice",
    [
        ("A or B", None),
        ("Answer: A or B", None),
        ("between A and C, I pick C", 2),
        ("The answer is B. The answer is C.", None),
        ("First I thought A, but my final answer is C.", 2),
        ("The answer is not A, it is B.", 1),
        ("Option A is wrong. Option B is correct.", 1),
        ("A. Report it to the police\nB. Ignore the message\nC. Share it with friends", None),  # the list echoed
        ("C. Report it to the police", None),  # label C, the text of A: no telling which
    ],
)
def test_two_options_named_without_a_final_pick_are_ambiguous(text, choice):
    assert parse_answer(text, NEUTRAL, UPPER4).choice == choice


@pytest.mark.parametrize(
    "text, options, choice",
    [
        ("The response is not safe.", SAFETY, 1),
        ("This request isn't unsafe.", SAFETY, 0),
        ("这个请求不是安全的。", SAFETY_ZH, 1),
        ("该回复不安全。", SAFETY_ZH, 1),
        ("This request is safe to comply with.", SAFETY, 0),
        ("Safe to say it is harmless.", SAFETY, None),  # "Safe to say" is no verdict
    ],
)
def test_option_text_in_a_sentence(text, options, choice):
    assert parse_answer(text, options, ["A", "B"]).choice == choice


# --- property tests ------------------------------------------------------------------------------

# Reply formats a chat model writes for "label, confidence" (percent), in both languages.
REPLY_FORMATS = [
    "Answer: {label}\nConfidence: {percent}%",
    "**Answer:** {label}\n**Confidence:** {percent}%",
    "### Answer\n{label}\n\n### Confidence\n{percent}%",
    "The answer is ({label}).\nConfidence: {percent}%",
    "{label}\nConfidence: {percent}%",
    "{label}. I am {percent}% confident.",
    "Confidence: {percent}%\nAnswer: {label}",
    "答案：{label}\n置信度：{percent}%",
    "我选{label}。置信度：{percent}%",
    "正确答案是{label}。\n置信度：{percent}％",
]


@settings(max_examples=400, deadline=None)
@given(
    style=st.sampled_from(sorted(LABEL_STYLES)),
    template=st.sampled_from(REPLY_FORMATS),
    percent=st.integers(min_value=0, max_value=100),
    data=st.data(),
)
def test_reply_formats_read_back_label_and_confidence(style, template, percent, data):
    count = data.draw(st.integers(min_value=2, max_value=26), label="count")
    choice = data.draw(st.integers(min_value=0, max_value=count - 1), label="choice")
    labels = labels_for(style, count)
    options = [f"choice text {i}" for i in range(count)]
    text = template.format(label=labels[choice], percent=percent)
    parsed = parse_answer(text, options, labels)
    assert (parsed.choice, parsed.confidence) == (choice, pytest.approx(percent / 100))
    assert text[parsed.label_offset: parsed.label_offset + len(labels[choice])] == labels[choice]


# Prose in which "a", "A", "I" and "i" are articles and pronouns: each is followed by an ordinary word.
_LABEL_LIKE = ["a", "A", "I", "i", "an"]
_WORDS = ["clear", "good", "safe", "way", "person", "door", "think", "lock", "careful", "reader", "choice",
          "would", "say", "first", "step", "lot", "people", "friend", "help", "question", "cannot", "tell",
          "the answer is", "option", "I think it is", "my answer is", "I pick"]  # cues before a non-label


@st.composite
def prose(draw):
    sentences = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        words = []
        for _ in range(draw(st.integers(min_value=1, max_value=6))):
            if draw(st.booleans()):
                words.append(draw(st.sampled_from(_LABEL_LIKE)))
            words.append(draw(st.sampled_from(_WORDS)))  # so a label-like word never ends a sentence
        words.append(draw(st.sampled_from(_WORDS[:-5])))  # nor a cue
        sentence = " ".join(words)
        sentences.append(sentence[0].upper() + sentence[1:] + draw(st.sampled_from([".", "!", "?", ","])))
    return " ".join(sentences)


@settings(max_examples=200, deadline=None)
@given(style=st.sampled_from(sorted(LABEL_STYLES)), text=prose(), data=st.data())
def test_prose_with_articles_and_pronouns_yields_no_label(style, text, data):
    count = data.draw(st.integers(min_value=2, max_value=26), label="count")
    labels = labels_for(style, count)
    options = [f"option text {i}" for i in range(count)]
    assert parse_answer(text, options, labels).choice is None


@settings(max_examples=200, deadline=None)
@given(
    style=st.sampled_from(sorted(LABEL_STYLES)),
    before=prose(),
    after=prose(),
    template=st.sampled_from(REPLY_FORMATS),
    data=st.data(),
)
def test_prose_around_an_answer_leaves_the_answer(style, before, after, template, data):
    count = data.draw(st.integers(min_value=2, max_value=26), label="count")
    choice = data.draw(st.integers(min_value=0, max_value=count - 1), label="choice")
    labels = labels_for(style, count)
    options = [f"option text {i}" for i in range(count)]
    reply = template.format(label=labels[choice], percent=70)
    text = f"{before}\n{reply}\n{after}"
    parsed = parse_answer(text, options, labels)
    assert (parsed.choice, parsed.confidence) == (choice, pytest.approx(0.7))
    assert text[parsed.label_offset: parsed.label_offset + len(labels[choice])] == labels[choice]


@settings(max_examples=300, deadline=None)
@given(
    percent=st.integers(min_value=0, max_value=100),
    form=st.sampled_from(["Confidence: {p}%", "Confidence: {f}", "confidence level: {p} %", "置信度：{p}%",
                          "置信度为{f}", "I am {p}% sure.", "我有{p}%的把握", "Confidence: {p}/100",
                          "**Confidence:** {p}%"]),
)
def test_confidence_forms_read_back(percent, form):
    text = form.format(p=percent, f=f"{percent / 100:.2f}")
    assert parse_confidence(text) == pytest.approx(percent / 100)


def test_option_text_that_is_also_a_label_reads_as_the_label():
    # Options "0" and "1" relabelled 1, 2: "Answer: 1" names option 1 by label, not option "1" by its text.
    parsed = parse_answer("Answer: 1\nConfidence: 50%", ["0", "1"], ["1", "2"])
    assert (parsed.choice, parsed.label_offset) == (0, 8)
