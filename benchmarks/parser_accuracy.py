"""How often the reply parser reads what a model meant, on the hand-labelled reply corpus.

    .venv/bin/python benchmarks/parser_accuracy.py [--old OLD_PROMPTS.py] [--corpus PATH] [--misses]

The corpus (tests/fixtures/reply_corpus.jsonl) holds replies of the embedded model and the formats 7B chat
models write, en and zh, each labelled by hand with the option it meant (null: no answer, a refusal, or two
options with no final pick) and the confidence it states (null: none). A reply counts as right when both the
choice and the confidence match. "trap reads" counts the replies tagged with a trap (an article, pronoun or word
that looks like a label: "a clear B", "I think", "A safe choice") where the parser read the trap as the answer.

To compare with an earlier parser, pass its replies.py (prompts.py before the parser moved out of it), e.g.
    git show HEAD~1:safeconf/replies.py > /tmp/old_replies.py
    .venv/bin/python benchmarks/parser_accuracy.py --old /tmp/old_replies.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "fixtures" / "reply_corpus.jsonl"
FIELDS = {"text": str, "options": list, "labels": list, "lang": str, "kind": str}


def load_corpus(path: Path = CORPUS) -> list[dict]:
    """The corpus rows, checked: a bad row fails naming its line and field."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not JSON ({error})") from None
            for field, kind in FIELDS.items():
                if not isinstance(row.get(field), kind):
                    raise ValueError(f"{where}: field {field!r} must be a {kind.__name__}, got {row.get(field)!r}")
            if len(row["options"]) != len(row["labels"]) or len(row["options"]) < 2:
                raise ValueError(f"{where}: field 'labels' must give one label to each of 2+ options")
            for field in ("expected_choice", "trap"):
                value = row.get(field)
                if value is not None and not (isinstance(value, int) and 0 <= value < len(row["options"])):
                    raise ValueError(f"{where}: field {field!r} must be null or an option index, got {value!r}")
            confidence = row.get("expected_confidence")
            if confidence is not None and not (isinstance(confidence, (int, float)) and 0 <= confidence <= 1):
                raise ValueError(f"{where}: field 'expected_confidence' must be null or in [0, 1], got {confidence!r}")
            rows.append(row | {"line": number})
    return rows


def _same_confidence(found: float | None, expected: float | None) -> bool:
    if found is None or expected is None:
        return found is expected
    return math.isclose(found, expected, abs_tol=1e-6)


def score(parse_answer, rows: list[dict]) -> dict:
    """Counts of rows read right (choice, confidence, both), trap reads, and the rows read wrong."""
    counts = Counter()
    misses = []
    for row in rows:
        parsed = parse_answer(row["text"], row["options"], row["labels"])
        choice_ok = parsed.choice == row["expected_choice"]
        confidence_ok = _same_confidence(parsed.confidence, row["expected_confidence"])
        counts["choice"] += choice_ok
        counts["confidence"] += confidence_ok
        counts["both"] += choice_ok and confidence_ok
        if row.get("trap") is not None:
            counts["trap rows"] += 1
            counts["trap reads"] += parsed.choice == row["trap"]
        if not (choice_ok and confidence_ok):
            misses.append({"line": row["line"], "kind": row["kind"], "text": row["text"],
                           "expected": (row["expected_choice"], row["expected_confidence"]),
                           "parsed": (parsed.choice, parsed.confidence)})
    return {"rows": len(rows), **counts, "misses": misses}


def load_parser(path: str):
    """parse_answer from a file of an earlier parser: safeconf/replies.py, or safeconf/prompts.py before the parser
    moved out of it."""
    spec = importlib.util.spec_from_file_location("old_prompts", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.parse_answer


def _report(name: str, result: dict, show_misses: bool) -> None:
    n = result["rows"]
    print(
        f"{name:>8}: both {result['both'] / n:6.1%}  choice {result['choice'] / n:6.1%}  "
        f"confidence {result['confidence'] / n:6.1%}  ({result['both']}/{n} right; "
        f"trap reads {result['trap reads']}/{result['trap rows']})"
    )
    if show_misses:
        for miss in result["misses"]:
            print(f"          line {miss['line']} [{miss['kind']}] expected {miss['expected']} parsed {miss['parsed']}: "
                  f"{miss['text'][:90]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(CORPUS), help="the reply corpus (JSONL)")
    parser.add_argument("--old", help="a replies.py (earlier: prompts.py) of an earlier parser to measure on the same corpus")
    parser.add_argument("--misses", action="store_true", help="list the replies each parser reads wrong")
    args = parser.parse_args()

    from safeconf.replies import parse_answer

    rows = load_corpus(Path(args.corpus))
    kinds = Counter(row["kind"] for row in rows)
    print(f"corpus: {len(rows)} replies ({sum(r['lang'] == 'zh' for r in rows)} zh, {kinds['embedded']} from the "
          f"embedded model), {sum(r.get('trap') is not None for r in rows)} with a label-like word")
    if args.old:
        _report("old", score(load_parser(args.old), rows), args.misses)
    _report("current", score(parse_answer, rows), args.misses)


if __name__ == "__main__":
    main()
