"""The parser of the replies to safeconf.prompts' prompts: which option a free-form reply chose, and the confidence it
stated."""

from __future__ import annotations

import re
from dataclasses import dataclass

from safeconf.data.judge import normalise_option
from safeconf.prompts import BUCKET_VALUES, BUCKETS


@dataclass
class ParsedAnswer:
    choice: int | None  # option index in the prompt's order
    confidence: float | None  # in [0, 1]
    label_offset: int | None  # character offset of the answer label in the text (for its token log-prob)


# --- Reading replies ------------------------------------------------------------------------------
#
# A reply names options by label ("Answer: B", "(B)", "B is correct", "我选B") or by text ("Unsafe.",
# "The response is unsafe", "答案为：不安全"). Every such mention is collected, then weighed:
#   strong    after an answer cue ("the answer is", "I pick", "答案：", "选") or before a verdict ("B is correct",
#             "B是正确的");
#   opening   it opens the reply ("B.", "Unsafe", "(C)");
#   rejected  negated ("not A", "A is wrong", "不是A");
#   echo      a line of the option list repeated ("A. Hold them down ..."), when two or more options are.
# The strong mentions decide when there are any, else the opening one, else the plain ones. If those name two
# different options the reply is ambiguous and has no choice ("A or B"; "Answer: A ... the answer is B"), except
# that a "final answer" cue wins over the rest. A label counts only as a whole token with a delimiter after it, and is matched
# case-sensitively (unless the labels are lower-case), so the article in "a clear B", the pronoun in "I think"
# and the word in "A safe choice" are never read as labels.

# Full-width letters and digits ("答案：Ｂ") read as ASCII; a one-to-one map keeps the character offsets.
_FULLWIDTH = {code: code - 0xFEE0 for code in [*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B)]}

_CLOSERS = frozenset(".,;:!?)]}）】」』。，、；：！？*~…")
_QUOTES = frozenset("\"'“”‘’「」")
# Words after which a label is a noun of the sentence ("B is correct", "A or B"). No article or pronoun is
# followed by one of them, so "A safe choice" and "I think" stay words.
_FOLLOWERS = re.compile(
    r"(?:is|was|seems|appears|looks|because|since|as|or|and|but|vs\.?|versus"
    r"|would\s+be\s+(?:the\s+)?(?:correct|right|best|answer))(?![A-Za-z])",
    re.IGNORECASE,
)
# What may stand between an answer cue and the label: markup, brackets and a few filler words.
_FILLER = (
    r"(?:[\s*_#:：=(（\[【「\"'“‘]|-(?!\w)"
    r"|\bis\b|\bwould\s+be\b|\bwill\s+be\b|\bshould\s+be\b|\bmust\s+be\b|\bdefinitely\b|\bprobably\b|\bclearly\b"
    r"|\bmost\s+likely\b|\blikely\b|\bcertainly\b|\boption\b|\bchoice\b|\bletter\b"
    r"|应该是|应该|应为|就是|是|为|选项)*"
)
_ANSWER_CUE = (
    r"(?:\b(?:(?P<final>final)\s+|correct\s+|right\s+|best\s+|my\s+)?answers?(?:\s+to\s+(?:this|the)\s+question)?"
    r"|\b(?:the\s+)?(?:correct|right|best|safest)\s+(?:option|choice|response|one)"
    r"|\bI(?:'d|'ll|\s+would|\s+will)?\s+(?:choose|pick|select|go\s+with|say|answer)"
    r"|\bmy\s+(?:choice|pick|selection)"
    r"|(?P<final_zh>最终)答案|正确答案|答案|正确选项|最佳选项|我的?选择|我的答案|我选|应选|选择|(?<!选)选(?!项))"
)
_CUE_BEFORE = re.compile(_ANSWER_CUE + _FILLER + r"\Z", re.IGNORECASE)  # a cue that ends where a mention starts
_CUE_AHEAD = re.compile(_ANSWER_CUE + _FILLER, re.IGNORECASE)  # every cue, for option text after it
_NEGATED_BEFORE = re.compile(
    r"(?:\bnot|n't|\bnever|\bneither|\bnor|\brather\s+than|\binstead\s+of|\bother\s+than|\bexcept|不是|不选|并非|而非|排除)"
    r"[\s*_(（\[\"“]*(?:option\s+|选项)?[\s*_(（\[\"“]*\Z",
    re.IGNORECASE,
)
_AFTER_LABEL = r"[\s*_)）\]】」\"'”’]*(?:\s*(?:选项|option))?(?:[:：,，\-–—]\s*)?"
_VERDICT_BAD = re.compile(
    _AFTER_LABEL + r"(?:(?:is|would\s+be|seems)\s+(?:(?:definitely|clearly|probably)\s+)?(?:not|wrong|incorrect|false)\b"
    r"|isn't|是?(?:错误|错的|不正确|不对)|不是)",
    re.IGNORECASE,
)
_VERDICT_GOOD = re.compile(
    _AFTER_LABEL + r"(?:(?:is|would\s+be|seems|appears)\s+(?:(?:the|definitely|clearly|probably|most\s+likely)\s+)*"
    r"(?:correct|right|true|best|safest|answer|most\s+appropriate)\b|(?:是|为)?(?:正确|对的|最安全|最合适|最佳|答案))",
    re.IGNORECASE,
)
_MARKUP = re.compile(r"[\s*_#>\"'“「(（\[【]*")  # what may open a reply or a line before its answer
# A line of a repeated option list: at a line start, or after the prompt's own heading ("选项：A. 安全").
_LINE_START = re.compile(
    r"(?:^|\n)[ \t*_#>\-•(（\[]*(?P<heading>(?:选项|options?)[ \t]*[:：][ \t]*)?\Z", re.IGNORECASE
)
_LIST_DOT = re.compile(r"[*_]*[.)）:：、]")  # "A.", "B)", "C：" opening a line of an option list
_PAIRED = re.compile(r"[*_]*[.)）:：、\-–—]?[\s*_(（\"“]*")  # between a label and its text: "B. Unsafe", "B (Unsafe)"
_JOINER = re.compile(
    r"[\s*_)）\]\"”]*(?:or|and|/|vs\.?|versus|或者?|还是|和|与|、)[\s*_(（\[\"“]*(?:option\s+|选项)?", re.IGNORECASE
)
# Where option text stands for an answer besides the opening, a line start and an answer cue. Loose (a word
# boundary after it suffices): after a copula ("is unsafe", "is safe to comply with", "是不安全的", "不是安全的"
# negated), a joiner ("Safe or Unsafe") or a subject in Chinese ("该回复不安全"). Strict (a delimiter after it):
# after a sentence, a list marker ("1. Safe") or bold markup.
_TEXT_LOOSE = re.compile(
    r"\b(?:is|are|was|be|seems|looks|appears|'s|’s)(?P<neg>n't|\s+not)?\s+"
    r"(?:(?:definitely|clearly|probably|likely|considered|deemed|rated|classified\s+as)\s+)*"
    r"(?:an?\s+(?=\S+\s+(?:option|one|choice|request|response|reply|text|answer)\b))?"  # "is a safe option"
    r"|(?P<neg_zh>不|并不|并非)?(?:是|为|属于)|\b(?:or|and)\s+|或者?|还是"
    r"|(?:回复|回答|内容|请求|文本|行为|做法|对话)(?:是|为|并|很|非常|属于)*",
    re.IGNORECASE,
)
_TEXT_STRICT = re.compile(r"[.!?。！？]\s+|(?<![A-Za-z0-9])[0-9A-Za-z][.)）、]\s*|\*\*")
_NOT_PREFIX = re.compile(r"not\s+", re.IGNORECASE)
_NEGATING_PREFIXES = ("not ", "un", "non-", "non", "in", "不", "非")


@dataclass
class _Mention:
    choice: int
    start: int
    end: int
    is_label: bool
    strong: bool = False  # after an answer cue, or before a verdict
    opening: bool = False  # it opens the reply
    final: bool = False
    rejected: bool = False
    echo: bool = False


def _is_cjk_or_fullwidth(ch: str) -> bool:
    # CJK ideographs, CJK punctuation and full-width forms: each ends a label ("答案：B。", "选B，因为");
    # wider than mutations' ideograph-only pattern, which measures language, not delimiters.
    code = ord(ch)
    return 0x3000 <= code <= 0x303F or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF or 0xFF00 <= code <= 0xFFEF


def _delimited(text: str, pos: int, quoted: bool) -> bool:
    """Whether a mention ending at `pos` ends there as a whole answer: the end, a line break, punctuation, a
    closing bracket, Chinese text, or a space before a bracket, a dash or a word that treats it as a noun."""
    if pos >= len(text) or text[pos] == "\n" or _is_cjk_or_fullwidth(text[pos]):
        return True
    ch = text[pos]
    if ch in ".,":  # "e.g.", "3.5", "1,000": a point inside a token is no delimiter
        return pos + 1 >= len(text) or not (text[pos + 1].isascii() and text[pos + 1].isalnum())
    if ch in _QUOTES:
        return quoted  # "'B'" but not "I'm"
    if ch in _CLOSERS:
        return True
    if ch in " \t":
        rest = text[pos:].lstrip(" \t")
        return (
            not rest
            or rest[0] == "\n"
            or rest[0] in "([（【-–—:：="
            or rest[0] in _CLOSERS
            or _is_cjk_or_fullwidth(rest[0])
            or bool(_FOLLOWERS.match(rest))
        )
    return False


def _negation_of(names: list[str], index: int) -> int | None:
    """The option that negates option `index` ("Unsafe" for "Safe" and back), if there is one."""
    name = names[index]
    for other, text in enumerate(names):
        if other != index and name and text and any(text == p + name or name == p + text for p in _NEGATING_PREFIXES):
            return other
    return None


def _label_mentions(text: str, labels: list[str], names: list[str]) -> list[_Mention]:
    lowercase = all(label == label.lower() for label in labels)
    # Lower-case labels (the relabel style) also match their upper-case form: models write "B" for option b.
    folded = [label.lower() for label in labels] if lowercase else list(labels)
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))  # "12" before "1"
    pattern = re.compile(rf"(?<![A-Za-z0-9'’.\-])({alternatives})(?![A-Za-z0-9])", re.IGNORECASE if lowercase else 0)
    mentions = []
    for match in pattern.finditer(text):
        start, end = match.span(1)
        found = match.group(1)
        choice = folded.index(found.lower() if lowercase else found)
        quoted = start > 0 and text[start - 1] in _QUOTES
        if _delimited(text, end, quoted) or _followed_by_own_text(text, end, names[choice]):
            mentions.append(_Mention(choice, start, end, is_label=True))
    return mentions


def _followed_by_own_text(text: str, end: int, name: str) -> bool:
    """'B Unsafe', 'A Hold them down firmly ...': the label, a space and its whole option text."""
    gap = len(text[end:]) - len(text[end:].lstrip(" \t"))
    if not name or gap == 0 or not text.lower().startswith(name, end + gap):
        return False
    return _delimited(text, end + gap + len(name), False)


def _text_mentions(text: str, names: list[str], after_labels: list[int]) -> list[_Mention]:
    """Option text where it stands for an answer: opening the reply or a line, after an answer cue, a label
    (`after_labels`: their ends), a copula, a joiner or a sentence. The longest option wins at a position, so
    "Unsafe" is never read as "Safe", nor 不安全 as 安全. Read after a negation, the text stands for the option
    that negates it ("not safe" is Unsafe); the mention's offset is that of the negated word."""
    positions: dict[int, tuple[bool, bool]] = {}  # position -> (negated, strict)
    for position in [0, *(m.end() for m in re.finditer(r"\n", text)), *after_labels]:
        positions[position] = (False, True)
    for match in _TEXT_STRICT.finditer(text):
        positions.setdefault(match.end(), (False, True))
    for match in [*_CUE_AHEAD.finditer(text), *_TEXT_LOOSE.finditer(text)]:
        negated = bool(match.groupdict().get("neg") or match.groupdict().get("neg_zh"))
        positions.setdefault(match.end(), (negated, False))
    by_length = sorted(range(len(names)), key=lambda i: len(names[i]), reverse=True)
    lowered = text.lower()
    mentions, seen = [], set()
    for position, (negated, strict) in sorted(positions.items()):
        position = _MARKUP.match(text, position).end()
        prefix = _NOT_PREFIX.match(text, position)
        if prefix:  # "The response is not safe."
            negated, position = not negated, prefix.end()
        quoted = position > 0 and text[position - 1] in _QUOTES
        for index in by_length:
            name = names[index]
            if not name or not lowered.startswith(name, position):
                continue
            end = position + len(name)
            if name[-1].isascii() and name[-1].isalnum():
                if strict and not _delimited(text, end, quoted):
                    continue  # "Safe to say, ..."
                if end < len(text) and text[end].isascii() and text[end].isalnum():
                    continue  # "no" in "not"
            choice = _negation_of(names, index) if negated else index
            if choice is not None and position not in seen:
                seen.add(position)
                mentions.append(_Mention(choice, position, end, is_label=False))
            break
    return mentions


def _weigh(text: str, mentions: list[_Mention]) -> None:
    """Mark each mention strong, opening, final, rejected or echo from the text around it."""
    for mention in mentions:
        before = text[max(0, mention.start - 80): mention.start]
        after = text[mention.end: mention.end + 60]
        # (Option text read after a negation already stands for the negated option.)
        if mention.is_label and (_NEGATED_BEFORE.search(before) or _VERDICT_BAD.match(after)):
            mention.rejected = True
            continue
        cue = _CUE_BEFORE.search(before)
        if cue:
            mention.strong = True
            mention.final = bool(cue.group("final") or cue.group("final_zh"))
        if mention.is_label and _VERDICT_GOOD.match(after):
            mention.strong = True
        mention.opening = bool(_MARKUP.fullmatch(text, 0, mention.start))
    ordered = sorted(mentions, key=lambda m: m.start)
    pairs = list(zip(ordered, ordered[1:]))
    # A label and option text right after it ("B. Unsafe") are one statement, as strong as each other; opening
    # the reply, it is a whole answer. If they name different options ("C. <the text of D>"), it is ambiguous.
    for first, second in pairs:
        if first.is_label and not second.is_label and _PAIRED.fullmatch(text, first.end, second.start):
            first.strong = second.strong = first.strong or second.strong or (
                first.opening and first.choice == second.choice)
            second.opening, second.rejected = first.opening, first.rejected
    # The option list repeated line by line ("A. Hold them down ...\nB. Move ..."), with the prompt's heading
    # perhaps ("选项：A\nA. ...\nB. ..."), is no answer.
    items = [
        m for m in mentions
        if m.is_label and (line := _LINE_START.search(text, 0, m.start))
        and (_LIST_DOT.match(text, m.end) or line.group("heading"))
    ]
    if len({m.choice for m in items}) >= 2:
        for mention in items:
            mention.echo = True
        for first, second in pairs:
            if first.echo and not second.is_label and _PAIRED.fullmatch(text, first.end, second.start):
                second.echo = True
    # "A or B", "Safe or Unsafe": an option joined to another is as strong, so the reply is ambiguous.
    for first, second in pairs:
        if first.end <= second.start and _JOINER.fullmatch(text, first.end, second.start):
            first.strong = second.strong = first.strong or second.strong
            first.opening = second.opening = first.opening or second.opening


def _decide(mentions: list[_Mention]) -> _Mention | None:
    """The mention that answers: a "final answer" cue, else the strong mentions, else what opens the reply, else
    the plain mentions; None when those disagree. A bare label opening the reply ("1. You can't hide it ... The
    answer is 3") gives way to an answer cue; one stated with its option text ("B. Unsafe") does not."""
    live = [m for m in mentions if not (m.rejected or m.echo)]
    strong = [m for m in live if m.strong]
    pool = [m for m in strong if m.final] or strong or [m for m in live if m.opening] or live
    if not pool or len({m.choice for m in pool}) > 1:
        return None
    # The first mention of the choice; a label before option text, as its token log-prob is read there.
    return min(pool, key=lambda m: (not m.is_label, m.start))


def _find_answer(text: str, options: list[str], labels: list[str]) -> tuple[int, int] | None:
    """(option index, character offset) of the answer a reply names, or None."""
    names = [normalise_option(option) for option in options]
    mentions = _label_mentions(text, labels, names)
    after_labels = [_PAIRED.match(text, m.end).end() for m in mentions]
    # Where option text is a label too (options "0", "1" labelled 1, 2), the label reading wins.
    mentions += [
        t for t in _text_mentions(text, names, after_labels)
        if not any(t.start < m.end and m.start < t.end for m in mentions)
    ]
    _weigh(text, mentions)
    chosen = _decide(mentions)
    return None if chosen is None else (chosen.choice, chosen.start)


# --- Confidence -----------------------------------------------------------------------------------

_CONFIDENCE_CUE = re.compile(
    r"(?:\bconfidence(?:\s+(?:level|score|rating))?|\bcertainty|置信度|置信水平|信心(?:值|指数)?|把握(?:程度)?|确信度|可信度)"
    r"[\s*_]*(?:(?:is|of|at|about|around|为|是|约为|约|大约|大概)[\s*_]*)*[:：=]?[\s*_]*(?:(?:about|around|约|大约)\s*)?",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)\s*(%|％|\s*percent\b|/\s*100\b|/\s*10\b)?", re.IGNORECASE)
# "I am 80% confident", "我有80%的把握": the number before the word.
_CONFIDENCE_AFTER = re.compile(
    r"(\d+(?:\.\d+)?)\s*(%|％|\s*percent\b)\s*(?:confident|sure|certain|confidence|certainty|的?把握|的?信心|确定)",
    re.IGNORECASE,
)
# Verbal confidence: the buckets format_target writes, and the near synonyms models use.
_VERBAL = {
    **{name: value for names in BUCKETS.values() for name, value in zip(names, BUCKET_VALUES)},
    "extremely low": 0.1, "moderate": 0.5, "extremely high": 0.9,
    "非常低": 0.1, "极低": 0.1, "较低": 0.3, "一般": 0.5, "中": 0.5, "较高": 0.7, "非常高": 0.9, "极高": 0.9,
}
_VERBAL_RE = re.compile(
    "(" + "|".join(re.escape(n) for n in sorted(_VERBAL, key=len, reverse=True)) + r")(?![A-Za-z])", re.IGNORECASE
)


def _number_value(number: str, unit: str | None) -> float | None:
    value = float(number)
    unit = (unit or "").replace(" ", "").lower()
    if unit == "/10":
        value /= 10
    elif unit or value > 1:  # "80%", "80 percent", "80/100", a bare 80
        value /= 100
    return value if 0 <= value <= 1 else None


def _confidence_statements(text: str) -> list[tuple[int, int, float | None]]:
    """(start, end, value) of each confidence statement; value None when it states none that can be read."""
    statements = []
    for cue in _CONFIDENCE_CUE.finditer(text):
        number = _NUMBER.match(text, cue.end())
        if number:
            statements.append((cue.start(), number.end(), _number_value(number.group(1), number.group(2))))
            continue
        verbal = _VERBAL_RE.match(text, cue.end())
        if verbal:
            statements.append((cue.start(), verbal.end(), _VERBAL[verbal.group(1).lower()]))
        else:
            statements.append((cue.start(), cue.end(), None))
    for match in _CONFIDENCE_AFTER.finditer(text):
        if not any(start <= match.start() < end for start, end, _ in statements):
            statements.append((match.start(), match.end(), _number_value(match.group(1), match.group(2))))
    return sorted(statements)


def parse_confidence(text: str, lang: str | None = None) -> float | None:
    """The first confidence the reply states that can be read ("Confidence: 80%", "0.8", "high", "置信度：很高",
    "I am 80% sure"), in [0, 1]; None when it states none."""
    text = text.translate(_FULLWIDTH)
    return next((value for _, _, value in _confidence_statements(text) if value is not None), None)


def parse_answer(text: str, options: list[str], labels: list[str]) -> ParsedAnswer:
    """Read the chosen option and the stated confidence from a reply, in either language."""
    text = text.translate(_FULLWIDTH)
    statements = _confidence_statements(text)
    confidence = next((value for _, _, value in statements if value is not None), None)
    # Blank out the confidence statements (keeping offsets), so "Confidence: 1" is never read as option 1.
    for start, end, _ in statements:
        text = text[:start] + " " * (end - start) + text[end:]
    found = _find_answer(text, options, labels)
    if found is None:
        return ParsedAnswer(None, confidence, None)
    return ParsedAnswer(found[0], confidence, found[1])
