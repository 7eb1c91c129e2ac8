"""Cost of the evaluation's bootstrap: the project's numpy metrics against scikit-learn's, in one run.

    .venv/bin/python benchmarks/bootstrap_metrics.py --questions 500 --resamples 200

The bootstrap calls every metric once per resample, per method and per group (overall, test split, each data
set, language, task, category): ~35 groups x 10 methods x 1,000 resamples in a real evaluation. Before issue 11
Brier, AUROC, unsafe-class F1 and average precision called scikit-learn, whose input validation costs
milliseconds a call on arrays of a few hundred; they are now numpy (tests/test_metrics.py checks them against
scikit-learn on tied and untied data). Both suites run on the same resamples of the same synthetic scores.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, f1_score, roc_auc_score

from safeconf.evaluation import metrics as M


def sklearn_suites(bins: int, l2_bins: int) -> tuple[dict, dict]:
    """The metric suites as they were: scikit-learn for the four it has, the same numpy for the rest."""
    confidence = M.metric_suite(bins, (0.5, 0.8), l2_bins)
    confidence["brier"] = lambda c, r: float(brier_score_loss(r.astype(int), c, labels=[0, 1]))
    confidence["auroc"] = lambda c, r: None if r.min() == r.max() else float(roc_auc_score(r.astype(int), c))
    guard = {
        "unsafe_f1": lambda p, f, g: float(f1_score(g, f, pos_label=1, labels=[0, 1], zero_division=0.0)),
        "unsafe_auprc": lambda p, f, g: None if g.max() == 0 else float(average_precision_score(g, p, pos_label=1)),
    }
    return confidence, guard


def timed(columns, suite, resamples: int) -> tuple[float, dict]:
    began = time.perf_counter()
    scored = M.score_columns(columns, suite, samples=resamples, seed=0)
    return time.perf_counter() - began, scored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--resamples", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    conf = rng.integers(0, 11, args.questions) / 10  # k=10 self-consistency: coarse, tied confidences
    right = (rng.random(args.questions) < conf).astype(float)
    p_unsafe = rng.random(args.questions)
    flagged, unsafe = (p_unsafe > 0.5).astype(int), (rng.random(args.questions) < p_unsafe).astype(int)
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; {args.questions} questions, "
          f"{args.resamples} resamples")
    old_conf, old_guard = sklearn_suites(10, 15)
    results = {}
    for name, conf_suite, guard_suite in (("sklearn", old_conf, old_guard),
                                          ("numpy", M.metric_suite(10, (0.5, 0.8), 15), M.guard_suite())):
        conf_s, conf_scores = timed((conf, right), conf_suite, args.resamples)
        guard_s, guard_scores = timed((p_unsafe, flagged, unsafe), guard_suite, args.resamples)
        results[name] = {"confidence_ms_per_resample": 1e3 * conf_s / args.resamples,
                         "guard_ms_per_resample": 1e3 * guard_s / args.resamples,
                         "scores": {**conf_scores, **guard_scores}}
    for key in results["sklearn"]["scores"]:  # same resamples: the intervals must agree to rounding
        a, b = results["sklearn"]["scores"][key], results["numpy"]["scores"][key]
        assert np.allclose(a["value"], b["value"]) and np.allclose(a["ci"], b["ci"]), (key, a, b)
    for name, r in results.items():
        print(json.dumps({"suite": name, **{k: round(v, 3) for k, v in r.items() if k != "scores"}}))
    old, new = results["sklearn"], results["numpy"]
    total = lambda r: r["confidence_ms_per_resample"] + r["guard_ms_per_resample"]
    print(f"numpy / sklearn speed: confidence metrics {old['confidence_ms_per_resample'] / new['confidence_ms_per_resample']:.1f}x, "
          f"guard metrics {old['guard_ms_per_resample'] / new['guard_ms_per_resample']:.1f}x, "
          f"both {total(old) / total(new):.1f}x (same values and intervals)")


if __name__ == "__main__":
    main()
