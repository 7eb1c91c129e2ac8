"""Confidence arithmetic: share of right answers over all variants x samples, mapped back to the original."""

import pytest

from safeconf.confidence import question_confidence


def sample(choice_original, verbal=None):
    return {"text": "", "choice": choice_original, "choice_original": choice_original,
            "verbal_confidence": verbal, "choice_logprob": None, "num_tokens": 3}


def row(answer, variants):
    return {"id": "q", "answer": answer, "variants": [
        {"mutation": mutation, "samples": [sample(*s) if isinstance(s, tuple) else sample(s) for s in samples]}
        for mutation, samples in variants]}


def test_confidence_is_the_share_of_right_answers_over_all_variants():
    r = question_confidence(row(1, [("original", [1, 1, 0, 1]), ("shuffle", [1, None, 2, 1])]))
    assert r["num_samples"] == 8 and r["num_valid"] == 7 and r["num_correct"] == 5
    assert r["confidence"] == pytest.approx(5 / 8)  # an unreadable answer counts as not right
    assert r["majority_answer"] == 1 and r["agreement"] == pytest.approx(5 / 8)


def test_per_mutation_breakdown_and_verbal_mean():
    r = question_confidence(row(0, [("original", [(0, 0.9), (0, 0.7)]), ("polarity", [(1, 0.5), (0, None)])]))
    by = {m["mutation"]: m for m in r["per_mutation"]}
    assert by["original"]["accuracy"] == 1.0 and by["original"]["agreement"] == 1.0
    assert by["polarity"]["accuracy"] == 0.5 and by["polarity"]["samples"] == 2
    assert r["verbal_confidence_mean"] == pytest.approx((0.9 + 0.7 + 0.5) / 3)


def test_unknown_gold_keeps_agreement_but_no_confidence():
    r = question_confidence(row(None, [("original", [2, 2, 1])]))
    assert r["confidence"] is None and r["num_correct"] == 0
    assert r["majority_answer"] == 2 and r["agreement"] == pytest.approx(2 / 3)


def test_ties_and_all_invalid():
    tie = question_confidence(row(0, [("original", [1, 0, 1, 0])]))
    assert tie["majority_answer"] == 0 and tie["agreement"] == 0.5
    none = question_confidence(row(0, [("original", [None, None])]))
    assert none["majority_answer"] is None and none["agreement"] == 0.0 and none["confidence"] == 0.0
    assert none["verbal_confidence_mean"] is None
