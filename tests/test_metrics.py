"""The evaluation metrics against hand-computed values and scikit-learn, the bootstrap intervals, and the
selective-threshold guarantee checked by simulation. Pure numpy: runs in seconds, no model, no Ray."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from safeconf.evaluation import metrics as M
from safeconf.evaluation.selective import (
    THRESHOLDS,
    choose_threshold,
    clopper_pearson_upper,
    min_accepted,
    selective_judgement,
)

# Four answers, two right: the running example of several hand computations below.
CONF4 = [0.9, 0.8, 0.7, 0.6]
RIGHT4 = [1, 0, 1, 0]


def random_scores(n=300, seed=1):
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    right = (rng.random(n) < conf).astype(int)
    return conf, right


# --- accuracy, ECE, adaptive ECE ------------------------------------------------------------------


def test_accuracy_and_empty_inputs():
    assert M.accuracy(CONF4, RIGHT4) == 0.5
    for metric in (M.accuracy, M.ece, M.adaptive_ece, M.brier, M.auroc, M.aurc):
        assert metric([], []) is None
    assert M.accuracy_at_coverage([], [], 0.5) is None


def test_ece_by_hand():
    # bins (0,.1] (.1,.2] (.2,.3] (.3,.4] ... (.8,.9]: gaps .1, .2, .7, .4 and two answers at .9 with accuracy .5
    conf, right = [0.1, 0.2, 0.3, 0.4, 0.9, 0.9], [0, 0, 1, 0, 1, 0]
    assert M.ece(conf, right, bins=10) == pytest.approx((0.1 + 0.2 + 0.7 + 0.4 + 2 * 0.4) / 6)
    # a perfectly calibrated bin has no error; one bin: |mean accuracy - mean confidence|
    assert M.ece([0.5, 0.5], [1, 0]) == pytest.approx(0.0)
    assert M.ece(CONF4, RIGHT4, bins=1) == pytest.approx(abs(0.5 - 0.75))


@pytest.mark.parametrize("bins", [5, 10, 15])
def test_ece_matches_sklearn_calibration_curve(bins):
    conf, right = random_scores()
    prob_true, prob_pred = calibration_curve(right, conf, n_bins=bins, strategy="uniform")
    counts = np.bincount(M.equal_width_bins(conf, bins), minlength=bins)
    weights = counts[counts > 0] / conf.size  # calibration_curve returns the non-empty bins, in order
    assert M.ece(conf, right, bins) == pytest.approx(float(np.sum(weights * np.abs(prob_true - prob_pred))))


def test_adaptive_ece_by_hand_and_ties_stay_together():
    conf, right = [0.1, 0.2, 0.3, 0.4, 0.9, 0.9], [0, 0, 1, 0, 1, 0]
    # equal-mass bins of 2: {.1,.2} acc 0 conf .15; {.3,.4} acc .5 conf .35; {.9,.9} acc .5 conf .9
    assert M.adaptive_ece(conf, right, bins=3) == pytest.approx((2 * 0.15 + 2 * 0.15 + 2 * 0.4) / 6)
    # tied confidences with different outcomes: the result must not depend on the order of the questions
    conf, right = [0.15, 0.15, 0.85, 0.95], [0, 1, 1, 1]
    values = {round(M.adaptive_ece([conf[i] for i in p], [right[i] for i in p], bins=4), 12)
              for p in itertools.permutations(range(4))}
    assert values == {round((2 * 0.35 + 0.15 + 0.05) / 4, 12)}


# --- Brier, AUROC ------------------------------------------------------------------------------------


def test_brier_by_hand_and_against_sklearn():
    assert M.brier(CONF4, RIGHT4) == pytest.approx((0.1**2 + 0.8**2 + 0.3**2 + 0.6**2) / 4)
    conf, right = random_scores()
    assert M.brier(conf, right) == pytest.approx(brier_score_loss(right, conf))
    assert M.brier([0.9, 1.0], [1, 1]) == pytest.approx(0.005)  # all right: still defined


def test_auroc_by_hand_against_sklearn_and_undefined():
    # right {.9, .7} vs wrong {.8, .6}: 3 of the 4 pairs ranked correctly
    assert M.auroc(CONF4, RIGHT4) == pytest.approx(0.75)
    assert M.auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie is half a win
    conf, right = random_scores()
    assert M.auroc(conf, right) == pytest.approx(roc_auc_score(right, conf))
    assert M.auroc([0.2, 0.9], [1, 1]) is None and M.auroc([0.2, 0.9], [0, 0]) is None


# --- risk-coverage --------------------------------------------------------------------------------------


def test_risk_curve_and_aurc_by_hand():
    coverage, risk = M.risk_curve(CONF4, RIGHT4)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk == pytest.approx([0, 1 / 2, 1 / 3, 2 / 4])
    assert M.aurc(CONF4, RIGHT4) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert M.aurc([0.9, 0.8], [1, 1]) == 0.0


def test_ties_spread_errors_evenly_as_the_average_over_tie_orders():
    conf, right = [0.9, 0.9, 0.5], [1, 0, 1]
    # inside the tie the first answer is wrong half of the time: risks .5, .5, 1/3
    assert M.aurc(conf, right) == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    # brute force: the mean AURC over every order of a bigger tie group equals the tie-aware value
    conf = [0.8, 0.6, 0.6, 0.6, 0.6, 0.2]
    right = [1, 0, 1, 1, 0, 0]
    tie = [1, 2, 3, 4]
    brute = []
    for order in itertools.permutations(tie):
        wrong = [1 - right[0]] + [1 - right[i] for i in order] + [1 - right[5]]
        brute.append(np.mean(np.cumsum(wrong) / np.arange(1, 7)))
    assert M.aurc(conf, right) == pytest.approx(np.mean(brute))
    assert M.aurc(conf[::-1], right[::-1]) == pytest.approx(M.aurc(conf, right))


def test_accuracy_at_coverage():
    assert M.accuracy_at_coverage(CONF4, RIGHT4, 0.5) == pytest.approx(0.5)  # top 2: .9 right, .8 wrong
    assert M.accuracy_at_coverage(CONF4, RIGHT4, 0.25) == pytest.approx(1.0)
    assert M.accuracy_at_coverage(CONF4, RIGHT4, 0.8) == pytest.approx(0.5)  # ceil(3.2) = all four
    conf = np.linspace(1, 0.1, 10)
    right = [1] * 8 + [0] * 2
    assert M.accuracy_at_coverage(conf, right, 0.8) == 1.0  # exactly 8 of 10, not 9
    assert M.accuracy_at_coverage(conf, right, 0.01) == 1.0  # at least one question


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        M.ece([0.5], [1, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.brier([1.2], [1])
    with pytest.raises(ValueError, match="0 and 1"):
        M.accuracy([0.5], [2])


def test_metric_suite_names():
    suite = M.metric_suite(10, ["0.5", 0.8])  # command-line lists arrive as strings
    assert list(suite) == ["accuracy", "ece", "adaptive_ece", "l2_ece", "brier", "brier_reliability",
                           "brier_resolution", "auroc", "sharpness", "aurc", "accuracy_at_50", "accuracy_at_80"]
    assert suite["accuracy_at_50"](np.array(CONF4), np.array(RIGHT4)) == pytest.approx(0.5)


# --- bootstrap -----------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_the_estimate_and_is_seeded():
    # An overconfident model (P(right | c) = c^2), as the report expects to see. On a nearly calibrated one the
    # binned ECE is biased upward in small samples, and its percentile interval can sit above the estimate.
    rng = np.random.default_rng(3)
    conf = rng.random(200)
    right = (rng.random(200) < conf**2).astype(int)
    suite = M.metric_suite()
    first = M.score(conf, right, suite, samples=300, seed=7)
    again = M.score(conf, right, suite, samples=300, seed=7)
    other = M.score(conf, right, suite, samples=300, seed=8)
    assert first == again
    assert first["ece"]["ci"] != other["ece"]["ci"]
    for name, entry in first.items():
        low, high = entry["ci"]
        assert low <= entry["value"] <= high, name
        assert high > low, name
    # one metric alone gets the same interval as in the suite (the same resamples): intervals are paired
    assert M.score(conf, right, {"brier": suite["brier"]}, samples=300, seed=7)["brier"] == first["brier"]


def test_bootstrap_width_shrinks_with_more_questions():
    small = M.score(*random_scores(50), {"accuracy": M.accuracy}, samples=400)["accuracy"]["ci"]
    large = M.score(*random_scores(2000), {"accuracy": M.accuracy}, samples=400)["accuracy"]["ci"]
    assert large[1] - large[0] < (small[1] - small[0]) / 3


def test_bootstrap_of_undefined_metric_gives_no_interval():
    result = M.score([0.9, 0.8, 0.7], [1, 1, 1], {"auroc": M.auroc, "accuracy": M.accuracy}, samples=100)
    assert result["auroc"] == {"value": None, "ci": None}
    assert result["accuracy"] == {"value": 1.0, "ci": [1.0, 1.0]}
    assert M.score([0.5], [1], {"accuracy": M.accuracy}, samples=100)["accuracy"]["ci"] is None


def test_reliability_table():
    table = M.reliability_table([0.05, 0.95, 0.95], [0, 1, 0], bins=10)
    assert len(table) == 10 and sum(b["count"] for b in table) == 3
    assert table[0]["accuracy"] == 0 and table[9]["accuracy"] == 0.5 and table[9]["confidence"] == pytest.approx(0.95)
    assert table[5]["accuracy"] is None


# --- selective judgement with a guarantee --------------------------------------------------------------


def test_clopper_pearson_upper_bound():
    # no errors in n: the bound solves (1 - p)^n = delta
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))
    assert clopper_pearson_upper(0, 0, 0.05) == 1.0 and clopper_pearson_upper(4, 4, 0.05) == 1.0
    # more evidence, tighter bound; always above the observed rate
    assert clopper_pearson_upper(10, 100, 0.1) < clopper_pearson_upper(1, 10, 0.1)
    assert clopper_pearson_upper(10, 100, 0.1) > 0.1


def test_choose_threshold_small_case():
    # 40 answers at .95 all right, 40 at .6 with half wrong: only .95 and above is safe at alpha .1
    conf = [0.95] * 40 + [0.6] * 40
    right = [1] * 40 + [1, 0] * 20
    choice = choose_threshold(conf, right, alpha=0.1, delta=0.1)
    assert choice.threshold == pytest.approx(0.61)  # lowest grid point above .6 still accepts only the .95s
    assert (choice.accepted, choice.errors) == (40, 0) and choice.upper_bound <= 0.1
    # nothing safe enough: no threshold, every judgement deferred
    none = choose_threshold([0.9] * 10, [0] * 10, alpha=0.1, delta=0.1)
    assert none.threshold is None and none.accepted == 0
    assert THRESHOLDS[0] == 1.0 and THRESHOLDS[-1] == 0.0 and len(THRESHOLDS) == 101
    # fewer than min_accepted judgements cannot pass even without errors, so they are passed over, not failed
    assert min_accepted(0.1, 0.1) == 22
    assert clopper_pearson_upper(0, 22, 0.1) <= 0.1 < clopper_pearson_upper(0, 21, 0.1)
    few_on_top = choose_threshold([1.0] * 5 + [0.9] * 60, [0] * 5 + [1] * 60, alpha=0.3, delta=0.1)
    assert few_on_top.threshold == 0.0 and (few_on_top.accepted, few_on_top.errors) == (65, 5)


def test_selective_judgement_reports_test_coverage_and_error():
    cal_conf = [0.95] * 40 + [0.6] * 40
    cal_right = [1] * 40 + [1, 0] * 20
    result = selective_judgement(cal_conf, cal_right, [0.99, 0.97, 0.5, 0.3], [1, 0, 1, 0], alpha=0.1, delta=0.1)
    assert result["threshold"] == pytest.approx(0.61)
    assert result["test_accepted"] == 2 and result["test_coverage"] == 0.5 and result["test_error"] == 0.5
    assert result["calibration_questions"] == 80 and result["calibration_accepted"] == 40


def _draw_continuous(rng, n):
    conf = rng.random(n)
    return conf, (rng.random(n) < conf).astype(int)  # calibrated: P(right | c) = c


def _risk_continuous(t):
    return (1 - t) / 2  # E[1 - c | c >= t] for c ~ U(0, 1)


DISCRETE_CONF = np.array([0.25, 0.5, 0.75, 1.0])  # like self-consistency with k = 4: many ties
DISCRETE_MASS = np.array([0.25, 0.25, 0.25, 0.25])
DISCRETE_RIGHT = np.array([0.3, 0.6, 0.82, 0.95])


def _draw_discrete(rng, n):
    conf = rng.choice(DISCRETE_CONF, size=n, p=DISCRETE_MASS)
    right = rng.random(n) < DISCRETE_RIGHT[np.searchsorted(DISCRETE_CONF, conf)]
    return conf, right.astype(int)


def _risk_discrete(t):
    kept = DISCRETE_CONF >= t - 1e-9
    return float(np.sum(DISCRETE_MASS[kept] * (1 - DISCRETE_RIGHT[kept])) / np.sum(DISCRETE_MASS[kept]))


def _naive_threshold(conf, right, alpha):
    """The plug-in rule with no bound: lowest threshold whose calibration error rate is <= alpha."""
    chosen = None
    for t in THRESHOLDS:
        kept = conf >= t - 1e-9
        if kept.any():
            if 1 - right[kept].mean() > alpha:
                break
            chosen = t
    return chosen


@pytest.mark.parametrize("draw, risk", [(_draw_continuous, _risk_continuous), (_draw_discrete, _risk_discrete)],
                         ids=["continuous", "discrete-ties"])
def test_threshold_guarantee_holds_by_simulation(draw, risk):
    """Over many calibration draws from a known distribution, the chosen threshold's true error rate exceeds
    alpha in at most delta of them (plus simulation noise); the plug-in rule without the bound does not."""
    alpha, delta, n, runs = 0.1, 0.1, 400, 1000
    rng = np.random.default_rng(2024)
    violations = naive_violations = chosen = 0
    for _ in range(runs):
        conf, right = draw(rng, n)
        threshold = choose_threshold(conf, right, alpha, delta).threshold
        if threshold is not None:
            chosen += 1
            violations += risk(threshold) > alpha + 1e-12
        naive = _naive_threshold(conf, right, alpha)
        naive_violations += naive is not None and risk(naive) > alpha + 1e-12
    slack = 3 * np.sqrt(delta * (1 - delta) / runs)
    assert violations / runs <= delta + slack
    assert chosen / runs > 0.4  # not vacuous: it often finds a threshold (power is limited at n = 400)
    assert naive_violations / runs > delta + 0.1  # the simulation would catch a rule that breaks the guarantee


@pytest.mark.parametrize("seed", range(5))
def test_numpy_metrics_equal_sklearn_on_tied_scores(seed):
    """The hot-path numpy metrics equal scikit-learn's, with the many ties a coarse confidence (k samples) gives."""
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, size=60) / 4  # five distinct values: ties everywhere
    gold = (rng.random(60) < scores * 0.8 + 0.1).astype(int)
    flagged = (scores >= 0.5).astype(int)
    assert M.auroc(scores, gold) == pytest.approx(roc_auc_score(gold, scores))
    assert M.brier(scores, gold) == pytest.approx(brier_score_loss(gold, scores))
    assert M.unsafe_auprc(scores, flagged, gold) == pytest.approx(average_precision_score(gold, scores))
    assert M.unsafe_f1(scores, flagged, gold) == pytest.approx(f1_score(gold, flagged))


# --- what a constant forecaster cannot pass: sharpness, the Brier decomposition, the base-rate reference ---


def test_sharpness_is_the_spread_of_the_confidences_and_zero_for_a_constant():
    assert M.sharpness([0.7] * 5) == 0.0
    assert M.sharpness(CONF4, RIGHT4) == pytest.approx(np.std(CONF4))
    assert M.sharpness([]) is None


def test_brier_decomposition_adds_up_where_each_bin_holds_one_confidence():
    rng = np.random.default_rng(3)
    conf = rng.choice([0.15, 0.35, 0.55, 0.75, 0.95], size=500)  # one value per equal-width bin
    right = (rng.random(500) < conf).astype(int)
    parts = M.brier_decomposition(conf, right, bins=10)
    assert parts["reliability"] - parts["resolution"] + parts["uncertainty"] == pytest.approx(M.brier(conf, right))
    assert parts["resolution"] > 0.02  # these confidences sort the questions into groups of different accuracy
    constant = M.brier_decomposition(np.full(500, right.mean()), right)
    assert constant["resolution"] == pytest.approx(0.0) and constant["reliability"] == pytest.approx(0.0)


def test_a_constant_confidence_has_auroc_one_half_and_the_suite_reports_the_new_metrics():
    suite = M.metric_suite()
    assert {"sharpness", "brier_reliability", "brier_resolution"} <= set(suite)
    assert M.auroc([0.6] * 4, RIGHT4) == 0.5


def test_the_base_rate_reference_is_the_methods_answers_at_its_calibration_accuracy():
    from safeconf.config import EvalConfig
    from safeconf.evaluation.results import method_summary

    rows = []
    for i in range(40):  # calibration: 30 of 40 right; test: 20 of 40 right, confidence that ranks them
        rows.append({"id": f"c{i}", "method": "m", "role": "base", "answer": 0, "choice": 0 if i < 30 else 1,
                     "confidence": 0.9 if i < 30 else 0.6, "split": "calibration", "fallback": False})
        rows.append({"id": f"t{i}", "method": "m", "role": "base", "answer": 0, "choice": 0 if i < 20 else 1,
                     "confidence": 0.9 if i < 20 else 0.6, "split": "test", "fallback": False})
    for row in rows:
        row.update(lang="en", task="judge", category=None, source="s", unsafe_option=None, p_unsafe=None,
                   truncated=False)
    summary = method_summary(rows, EvalConfig(bootstrap_samples=50))
    reference = summary["base_rate"]
    assert reference["confidence"] == 0.75
    test = reference["test"]
    assert test["accuracy"]["value"] == summary["test"]["accuracy"]["value"] == 0.5  # the same answers
    assert test["ece"]["value"] == pytest.approx(0.25) and test["auroc"]["value"] == 0.5
    assert test["sharpness"]["value"] == 0.0 and test["brier_resolution"]["value"] == pytest.approx(0.0)
    assert summary["test"]["auroc"]["value"] == 1.0 and summary["test"]["brier_resolution"]["value"] > 0.2
