"""How good a confidence is: accuracy, calibration (ECE, adaptive ECE, L2 ECE, Brier), discrimination (AUROC)
and selective prediction (risk-coverage, AURC, accuracy at a coverage), with seeded bootstrap intervals; and
the guard-model metrics of the unsafe class (F1, AUPRC).

The confidence metrics take `confidence` (in [0, 1]) and `correct` (1 right / 0 wrong) for the same questions;
the guard metrics take `p_unsafe` (the probability a judgement puts on the unsafe option), `flagged` (1 when it
chose the unsafe option) and `unsafe` (1 when the gold answer is the unsafe option). Each returns a float, or
None where it is undefined (no questions; AUROC when all answers are right or all wrong; AUPRC without an
unsafe question). All are a few lines of numpy: the bootstrap calls each of them thousands of times per method and
group, and scikit-learn's input validation (~2-4 ms a call) made the bootstrap most of an evaluation's time. The
tests check Brier, AUROC, F1 and average precision against scikit-learn's on tied and untied data.

The calibration errors are of the top-label confidence (the probability of the chosen answer):
- `ece`: sum over equal-width bins of (bin share) x |accuracy - mean confidence| (L1), bins as sklearn's
  calibration_curve;
- `adaptive_ece`: the same over equal-mass bins;
- `l2_ece`: sqrt of the sum over equal-mass bins of (bin share) x (accuracy - mean confidence)^2, with 15 bins
  the L2 estimator Liu et al. (ICLR 2025, "On Calibration of LLM-based Guard Models") report.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

Metric = Callable[[np.ndarray, np.ndarray], "float | None"]


def as_arrays(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=float).reshape(-1)
    right = np.asarray(correct, dtype=float).reshape(-1)
    if conf.shape != right.shape:
        raise ValueError(f"confidence and correct differ in length: {conf.size} vs {right.size}")
    if conf.size and (np.isnan(conf).any() or conf.min() < 0 or conf.max() > 1):
        raise ValueError("confidence must be numbers in [0, 1]")
    if not np.isin(right, (0.0, 1.0)).all():
        raise ValueError("correct must hold only 0 and 1")
    return conf, right


def accuracy(confidence, correct) -> float | None:
    _, right = as_arrays(confidence, correct)
    return float(right.mean()) if right.size else None


def _calibration_error(conf: np.ndarray, right: np.ndarray, bin_ids: np.ndarray, power: int = 1) -> float:
    """(Sum over bins of (bin share) x |accuracy - mean confidence|^power)^(1/power): L1 ECE, or L2 with power 2."""
    counts = np.bincount(bin_ids)
    used = counts > 0
    mean_conf = np.bincount(bin_ids, weights=conf)[used] / counts[used]
    mean_right = np.bincount(bin_ids, weights=right)[used] / counts[used]
    return float(np.sum(counts[used] / conf.size * np.abs(mean_right - mean_conf) ** power) ** (1 / power))


def equal_width_bins(conf: np.ndarray, bins: int) -> np.ndarray:
    """Bin index of each confidence; bins are (i/bins, (i+1)/bins], 0 in the first: sklearn's calibration_curve."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.searchsorted(edges[1:-1], conf, side="left")


def ece(confidence, correct, bins: int = 10) -> float | None:
    """Expected calibration error over `bins` equal-width confidence bins."""
    conf, right = as_arrays(confidence, correct)
    if not conf.size:
        return None
    return _calibration_error(conf, right, equal_width_bins(conf, bins))


def equal_mass_bins(conf: np.ndarray, bins: int) -> np.ndarray:
    """Bin index by rank, `bins` bins of (nearly) equal size. Tied confidences share their average rank, so
    they always fall in one bin: the result does not depend on the order the questions come in."""
    ranks = rankdata(conf, method="average")  # 1..n
    return np.minimum(((ranks - 0.5) * bins / conf.size).astype(int), bins - 1)


def adaptive_ece(confidence, correct, bins: int = 10) -> float | None:
    """Calibration error over equal-mass bins: no bin is empty where confidences crowd together."""
    conf, right = as_arrays(confidence, correct)
    if not conf.size:
        return None
    return _calibration_error(conf, right, equal_mass_bins(conf, bins))


def l2_ece(confidence, correct, bins: int = 15) -> float | None:
    """L2 calibration error over `bins` equal-mass bins (Liu et al.'s estimator at 15 bins)."""
    conf, right = as_arrays(confidence, correct)
    if not conf.size:
        return None
    return _calibration_error(conf, right, equal_mass_bins(conf, bins), power=2)


def brier(confidence, correct) -> float | None:
    """Mean squared difference between confidence and correctness."""
    conf, right = as_arrays(confidence, correct)
    if not conf.size:
        return None
    return float(np.mean((conf - right) ** 2))


def sharpness(confidence, correct=None) -> float | None:
    """Standard deviation of the confidences: how much a method's confidence varies from question to question.
    0 for a constant forecaster (the base-rate reference), whatever its ECE."""
    conf = np.asarray(confidence, dtype=float)
    return float(conf.std()) if conf.size else None


def brier_decomposition(confidence, correct, bins: int = 10) -> dict | None:
    """Murphy's decomposition over equal-width bins: Brier ~ reliability - resolution + uncertainty.
    reliability: the bins' weighted squared gap between mean confidence and accuracy (lower is better);
    resolution: the bins' weighted squared spread of accuracy around the overall accuracy (higher is better: the
    confidence sorts questions into groups that differ in accuracy; 0 for a constant); uncertainty: acc x (1 - acc).
    The identity holds exactly when every question of a bin has the same confidence."""
    conf, right = as_arrays(confidence, correct)
    if not conf.size:
        return None
    ids = equal_width_bins(conf, bins)
    base = right.mean()
    reliability = resolution = 0.0
    for b in np.unique(ids):
        inside = ids == b
        weight = inside.mean()
        reliability += weight * (conf[inside].mean() - right[inside].mean()) ** 2
        resolution += weight * (right[inside].mean() - base) ** 2
    return {"reliability": float(reliability), "resolution": float(resolution),
            "uncertainty": float(base * (1 - base))}


def auroc(confidence, correct) -> float | None:
    """AUROC of confidence against correctness: the probability that a right answer gets more confidence than a
    wrong one (ties count one half), i.e. whether confidence tells right answers from wrong ones. 0.5 = no better
    than chance (a constant confidence scores exactly 0.5), 1 = every right answer above every wrong one. None
    when only one kind exists."""
    conf, right = as_arrays(confidence, correct)
    if right.size == 0 or right.min() == right.max():
        return None
    # Mann-Whitney U over average ranks: ties count one half, as in sklearn's roc_auc_score
    positives = int(right.sum())
    negatives = right.size - positives
    rank_sum = rankdata(conf, method="average")[right == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def risk_curve(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk): answering the k most confident questions, k = 1..n, what share is wrong.

    Ties cannot be split by any threshold, so inside a group of equal confidences the errors are spread
    evenly (the expected risk over the orders the tie could be broken in); the curve then does not depend
    on the order the questions come in.
    """
    conf, right = as_arrays(confidence, correct)
    if not conf.size:
        return np.empty(0), np.empty(0)
    order = np.argsort(-conf, kind="stable")
    conf, wrong = conf[order], 1.0 - right[order]
    _, starts, sizes = np.unique(-conf, return_index=True, return_counts=True)
    group_errors = np.add.reduceat(wrong, starts)
    errors_before = np.concatenate([[0.0], np.cumsum(group_errors)[:-1]])
    group = np.repeat(np.arange(starts.size), sizes)
    k = np.arange(1, conf.size + 1)
    errors = errors_before[group] + (k - starts[group]) * group_errors[group] / sizes[group]
    return k / conf.size, errors / k


def aurc(confidence, correct) -> float | None:
    """Area under the risk-coverage curve (mean risk over k = 1..n); lower is better."""
    _, risk = risk_curve(confidence, correct)
    return float(risk.mean()) if risk.size else None


def accuracy_at_coverage(confidence, correct, coverage: float) -> float | None:
    """Accuracy on the most confident `coverage` share of questions (at least one question)."""
    _, risk = risk_curve(confidence, correct)
    if not risk.size:
        return None
    k = max(1, math.ceil(coverage * risk.size - 1e-9))  # 1e-9: 0.8 * 10 must stay 8, not become 9
    return float(1.0 - risk[k - 1])


def coverage_key(coverage: float) -> str:
    return f"accuracy_at_{round(coverage * 100)}"


def guard_arrays(p_unsafe, flagged, unsafe) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(p_unsafe, dtype=float).reshape(-1)
    flag = np.asarray(flagged, dtype=int).reshape(-1)
    gold = np.asarray(unsafe, dtype=int).reshape(-1)
    if not p.size == flag.size == gold.size:
        raise ValueError(f"p_unsafe, flagged and unsafe differ in length: {p.size}, {flag.size}, {gold.size}")
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise ValueError("p_unsafe must be numbers in [0, 1]")
    if not (np.isin(flag, (0, 1)).all() and np.isin(gold, (0, 1)).all()):
        raise ValueError("flagged and unsafe must hold only 0 and 1")
    return p, flag, gold


def unsafe_f1(p_unsafe, flagged, unsafe) -> float | None:
    """F1 of the unsafe class (judged unsafe vs gold unsafe); 0 when nothing is flagged or nothing is unsafe."""
    _, flag, gold = guard_arrays(p_unsafe, flagged, unsafe)
    if not gold.size:
        return None
    true_positives = int(np.sum(flag & gold))
    flagged_or_unsafe = int(flag.sum() + gold.sum())
    return 2 * true_positives / flagged_or_unsafe if flagged_or_unsafe else 0.0


def unsafe_auprc(p_unsafe, flagged, unsafe) -> float | None:
    """Area under the precision-recall curve of the unsafe class, scored by P(unsafe) (average precision);
    None without an unsafe question."""
    p, _, gold = guard_arrays(p_unsafe, flagged, unsafe)
    if not gold.size or gold.max() == 0:
        return None
    # sklearn's average_precision_score: sum over distinct thresholds (high to low) of recall gain x precision
    order = np.argsort(-p, kind="stable")
    p, gold = p[order], gold[order]
    last_of_threshold = np.r_[np.flatnonzero(np.diff(p)), p.size - 1]
    true_positives = np.cumsum(gold)[last_of_threshold]
    precision = true_positives / (last_of_threshold + 1)
    recall_gain = np.diff(np.r_[0, true_positives]) / true_positives[-1]
    return float(np.sum(recall_gain * precision))


def guard_suite() -> dict[str, Callable]:
    """The guard-model metrics, by name: over (p_unsafe, flagged, unsafe) of the judgements with an unsafe option."""
    return {"unsafe_f1": unsafe_f1, "unsafe_auprc": unsafe_auprc}


def metric_suite(bins: int = 10, coverages=(0.5, 0.8), l2_bins: int = 15) -> dict[str, Metric]:
    """The metrics of the report, by name, in the order they are shown."""
    suite: dict[str, Metric] = {
        "accuracy": accuracy,
        "ece": lambda c, r: ece(c, r, bins),
        "adaptive_ece": lambda c, r: adaptive_ece(c, r, bins),
        "l2_ece": lambda c, r: l2_ece(c, r, l2_bins),
        "brier": brier,
        "brier_reliability": lambda c, r: (brier_decomposition(c, r, bins) or {}).get("reliability"),
        "brier_resolution": lambda c, r: (brier_decomposition(c, r, bins) or {}).get("resolution"),
        "auroc": auroc,
        "sharpness": sharpness,
        "aurc": aurc,
    }
    for level in coverages:
        suite[coverage_key(float(level))] = lambda c, r, level=float(level): accuracy_at_coverage(c, r, level)
    return suite


def score(confidence, correct, metrics: dict[str, Metric], samples: int = 1000, seed: int = 0,
          level: float = 0.95) -> dict[str, dict]:
    """{name: {"value": point estimate, "ci": [low, high] or None}} for every metric.

    All metrics share the same resamples, and the same seed gives the same resamples for every method
    scored on the same questions, so intervals of two methods are paired. Resamples where a metric is
    undefined (e.g. AUROC when a resample holds only right answers) are left out of its interval.
    Binned ECE is biased upward in small samples (a resample's duplicates make bins look miscalibrated), so
    for a nearly calibrated method its percentile interval can lie above the point estimate.
    """
    return score_columns(as_arrays(confidence, correct), metrics, samples, seed, level)


def score_columns(columns: tuple[np.ndarray, ...], metrics: dict[str, Callable], samples: int = 1000, seed: int = 0,
                  level: float = 0.95) -> dict[str, dict]:
    """`score` over any per-question columns of equal length (each metric takes them in order), e.g. the guard
    metrics' (p_unsafe, flagged, unsafe)."""
    size = columns[0].size
    result = {name: {"value": fn(*columns), "ci": None} for name, fn in metrics.items()}
    if samples <= 0 or size < 2:
        return result
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in metrics}
    for indices in rng.integers(0, size, size=(samples, size)):
        drawn = tuple(column[indices] for column in columns)
        for name, fn in metrics.items():
            value = fn(*drawn)
            if value is not None:
                draws[name].append(value)
    tail = (1 - level) / 2 * 100
    for name, values in draws.items():
        if result[name]["value"] is not None and len(values) >= samples / 2:  # mostly undefined: no interval
            low, high = np.percentile(values, [tail, 100 - tail])
            result[name]["ci"] = [float(low), float(high)]
    return result


def reliability_table(confidence, correct, bins: int = 10) -> list[dict]:
    """Per equal-width bin: its range, size, mean confidence and accuracy (None for an empty bin); for plots."""
    conf, right = as_arrays(confidence, correct)
    ids = equal_width_bins(conf, bins)
    rows = []
    for b in range(bins):
        inside = ids == b
        n = int(inside.sum())
        rows.append({
            "low": b / bins,
            "high": (b + 1) / bins,
            "count": n,
            "confidence": float(conf[inside].mean()) if n else None,
            "accuracy": float(right[inside].mean()) if n else None,
        })
    return rows
