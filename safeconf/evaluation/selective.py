"""Selective judgement with a guarantee: accept a judgement only when its confidence clears a threshold,
chosen on a calibration split so that the error rate of accepted judgements stays below `alpha` with
probability at least 1 - `delta` (learn-then-test with fixed-sequence testing).

For each threshold t on a grid fixed in advance, from high to low, the hypothesis "the error rate of the
judgements accepted at t exceeds alpha" is tested with the exact binomial test: it is rejected when the
Clopper-Pearson upper bound on that error rate (at level 1 - delta) is at most alpha. Testing stops at the
first threshold that cannot be rejected; the lowest rejected one is chosen. Fixed-sequence testing spends
the whole delta on each test, because no later test runs unless all earlier ones were rejected.

The top thresholds accept few calibration questions, and below `min_accepted(alpha, delta)` of them even
zero errors cannot bring the bound under alpha: those tests can never reject, carry no evidence, and are
passed over rather than ending the sequence (else it would always stop at the top of the grid). Accepted
counts only grow down the grid, so they are a prefix of it. The simulation in tests/test_metrics.py checks
that the guarantee holds with this rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import math

import numpy as np
from scipy.stats import beta

# The thresholds must not depend on the calibration data (learn-then-test): 1.00, 0.99, ..., 0.00.
THRESHOLDS = np.round(np.linspace(1.0, 0.0, 101), 2)
_EPS = 1e-9  # confidence 0.7 computed as 0.6999999999 still clears the threshold 0.70


def clopper_pearson_upper(errors, accepted, delta: float):
    """One-sided (1 - delta) upper confidence bound on an error rate from `errors` out of `accepted`.

    Vectorised over arrays; 1.0 where nothing was accepted or everything was wrong.
    """
    errors = np.asarray(errors, dtype=float)
    accepted = np.asarray(accepted, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        bound = beta.ppf(1 - delta, errors + 1, accepted - errors)
    return np.where((accepted == 0) | (errors >= accepted), 1.0, bound)


def min_accepted(alpha: float, delta: float) -> int:
    """Fewest accepted judgements whose bound can reach alpha: with zero errors it is 1 - delta^(1/n) <= alpha."""
    return math.ceil(math.log(delta) / math.log(1 - alpha) - 1e-9)


@dataclass
class Threshold:
    threshold: float | None  # None: no threshold is safe enough; defer every judgement
    accepted: int  # calibration judgements accepted at the threshold
    errors: int
    upper_bound: float | None  # Clopper-Pearson bound on their error rate (<= alpha when chosen)


def choose_threshold(confidence, correct, alpha: float, delta: float, thresholds=THRESHOLDS) -> Threshold:
    """The lowest threshold whose accepted calibration judgements have error rate <= alpha w.p. >= 1 - delta."""
    conf = np.asarray(confidence, dtype=float)
    wrong = 1 - np.asarray(correct, dtype=int)
    accept = conf[None, :] >= thresholds[:, None] - _EPS  # (thresholds, questions)
    accepted = accept.sum(axis=1)
    errors = (accept * wrong[None, :]).sum(axis=1)
    bound = clopper_pearson_upper(errors, accepted, delta)
    tested = np.flatnonzero(accepted >= min_accepted(alpha, delta))  # the untestable top is passed over
    chosen = None
    for i in tested:
        if bound[i] > alpha:
            break  # fixed sequence: the first threshold that fails ends the testing
        chosen = i
    if chosen is None:
        return Threshold(None, 0, 0, None)
    return Threshold(float(thresholds[chosen]), int(accepted[chosen]), int(errors[chosen]), float(bound[chosen]))


def selective_judgement(cal_confidence, cal_correct, test_confidence, test_correct, alpha: float,
                        delta: float) -> dict:
    """Choose the threshold on the calibration split; report the error and coverage it reaches on the test split."""
    choice = choose_threshold(cal_confidence, cal_correct, alpha, delta)
    test_conf = np.asarray(test_confidence, dtype=float)
    test_right = np.asarray(test_correct, dtype=int)
    if choice.threshold is None:
        accepted = np.zeros(test_conf.size, dtype=bool)
    else:
        accepted = test_conf >= choice.threshold - _EPS
    n_accepted = int(accepted.sum())
    return {
        "alpha": alpha,
        "delta": delta,
        "calibration_questions": int(np.size(cal_confidence)),
        **{f"calibration_{k}": v for k, v in asdict(choice).items() if k != "threshold"},
        "threshold": choice.threshold,
        "test_questions": int(test_conf.size),
        "test_accepted": n_accepted,
        "test_coverage": n_accepted / test_conf.size if test_conf.size else None,
        "test_error": float(1 - test_right[accepted].mean()) if n_accepted else None,
    }


def cascade(confidence, correct, answered, threshold: float | None, judge_accuracy: float) -> dict:
    """SafeConf in front of a stronger judge ("Trust or Escalate"), as the endpoint runs it with serve.escalate_url:
    a judgement below the threshold, or unreadable, is escalated; the rest SafeConf keeps. Over held-out questions:
    the share escalated, the accuracy of what SafeConf kept, and the overall accuracy if the stronger judge is right
    on a share `judge_accuracy` of what it gets (a stated figure, measured elsewhere: it is not re-measured here)."""
    conf = np.asarray(confidence, dtype=float)
    right = np.asarray(correct, dtype=int)
    kept = np.asarray(answered, dtype=bool) & (conf >= threshold - _EPS if threshold is not None else False)
    n, n_kept = int(conf.size), int(kept.sum())
    return {
        "questions": n,
        "threshold": threshold,
        "escalated_share": (n - n_kept) / n if n else None,
        "kept_accuracy": float(right[kept].mean()) if n_kept else None,
        "judge_accuracy": judge_accuracy,
        "overall_accuracy": (float(right[kept].sum()) + judge_accuracy * (n - n_kept)) / n if n else None,
        "safeconf_alone_accuracy": float(right.mean()) if n else None,
    }
