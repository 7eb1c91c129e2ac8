"""Self-consistency confidence of a question over its mutated variants: a pure per-row map, no shuffle."""

from __future__ import annotations

from collections import Counter


def _stats(answers: list[int | None], gold: int | None) -> tuple[int, int, int, int | None, float | None]:
    """(samples, valid, correct, majority answer, agreement) of answers in the original option order.

    An unparseable answer (None) counts as a sample that is neither right nor agreeing: the share of right
    answers is over everything the model said, not only over what could be read.
    """
    total = len(answers)
    valid = [a for a in answers if a is not None]
    correct = sum(1 for a in valid if gold is not None and a == gold)
    if not valid:
        return total, 0, correct, None, (0.0 if total else None)
    counts = Counter(valid)
    top = max(counts.values())
    majority = min(a for a, c in counts.items() if c == top)  # ties go to the lowest index: deterministic
    return total, len(valid), correct, majority, top / total


def question_confidence(row: dict) -> dict:
    """Add confidence, agreement, majority answer, per-mutation breakdown and mean verbalized confidence."""
    gold = row["answer"]
    answers, verbal, by_mutation = [], [], {}
    for variant in row["variants"]:
        variant_answers = [s["choice_original"] for s in variant["samples"]]
        answers += variant_answers
        by_mutation.setdefault(variant["mutation"], []).extend(variant_answers)
        verbal += [s["verbal_confidence"] for s in variant["samples"] if s["verbal_confidence"] is not None]
    total, valid, correct, majority, agreement = _stats(answers, gold)
    per_mutation = []
    for mutation, mutation_answers in sorted(by_mutation.items()):
        m_total, m_valid, m_correct, _, m_agreement = _stats(mutation_answers, gold)
        per_mutation.append(
            {
                "mutation": mutation,
                "samples": m_total,
                "valid": m_valid,
                "correct": m_correct,
                "accuracy": (m_correct / m_total) if gold is not None and m_total else None,
                "agreement": m_agreement,
            }
        )
    return {
        **row,
        "num_samples": total,
        "num_valid": valid,
        "num_correct": correct,
        "confidence": (correct / total) if gold is not None and total else None,
        "majority_answer": majority,
        "agreement": agreement,
        "verbal_confidence_mean": (sum(verbal) / len(verbal)) if verbal else None,
        "per_mutation": per_mutation,
    }
