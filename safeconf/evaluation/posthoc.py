"""Post-hoc calibration of token_prob's option distribution, the guard-model baselines of Liu et al. (ICLR 2025,
"On Calibration of LLM-based Guard Models"): temperature scaling fitted on the calibration split, and batch
calibration (division by the mean distribution of a data set). The runner applies them after the engine pass
(contextual calibration needs the engine, so it is a method of its own: safeconf.evaluation.methods)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy.optimize import minimize_scalar

from safeconf.engines.base import softmax
from safeconf.evaluation.methods import POSTHOC_METHODS, Judgement, divided, unsafe_probability


def _logs(probs) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probs, dtype=float), np.finfo(float).tiny))


def temperature_scaled(probs, temperature: float) -> list[float]:
    """softmax(log p / T): the options' ranking kept, the distribution sharpened (T < 1) or flattened (T > 1)."""
    return softmax(list(_logs(probs) / temperature))


def temperature_nll(prob_rows: list, answers: list[int], temperature: float) -> float:
    """Mean negative log-likelihood of the gold answers under the temperature-scaled distributions."""
    total = 0.0
    for probs, answer in zip(prob_rows, answers):
        scaled = _logs(probs) / temperature
        total -= scaled[answer] - np.logaddexp.reduce(scaled)
    return total / len(answers)


def fit_temperature(prob_rows: list, answers: list[int]) -> float:
    """The temperature that minimises the NLL of the gold answers (over log T in [-5, 5], bounded Brent);
    1.0 without questions to fit on."""
    if not answers:
        return 1.0
    found = minimize_scalar(lambda log_t: temperature_nll(prob_rows, answers, math.exp(log_t)), bounds=(-5.0, 5.0),
                            method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


def calibrate_posthoc(predictions: list[dict]) -> tuple[list[dict], dict]:
    """The POSTHOC_METHODS rows (token_prob's judgement, as the engine pass wrote them) calibrated on the safety
    questions: temperature fitted on the gold-labelled calibration split and applied to every row; batch priors
    from every evaluated row of a (data set, option count) group. Returns the rows and {method: what was
    fitted}, for metrics.json."""
    out, fitted = [], {}
    by_method = defaultdict(list)
    for row in predictions:
        (by_method[row["method"]] if row["method"] in POSTHOC_METHODS else out).append(row)
    for method, rows in by_method.items():
        missing = [r["id"] for r in rows if r.get("option_probs") is None]
        if missing:
            raise ValueError(f"{method}: rows {missing[:5]} have no option_probs to calibrate")
        if method == "token_prob_temperature":
            fit = [r for r in rows if r["eval_set"] == "safety" and r["split"] == "calibration" and r["answer"] is not None]
            probs, answers = [r["option_probs"] for r in fit], [r["answer"] for r in fit]
            temperature = fit_temperature(probs, answers)
            fitted[method] = {
                "temperature": temperature, "fitted_on": len(fit), "split": "calibration",
                "nll_before": temperature_nll(probs, answers, 1.0) if fit else None,
                "nll_after": temperature_nll(probs, answers, temperature) if fit else None,
            }
            calibrated = [temperature_scaled(r["option_probs"], temperature) for r in rows]
        else:
            groups = defaultdict(list)
            for i, r in enumerate(rows):
                groups[r["eval_set"], r["source"], len(r["option_probs"])].append(i)
            priors, calibrated = {}, [None] * len(rows)
            for (eval_set, source, count), members in sorted(groups.items(), key=str):
                prior = np.mean([rows[i]["option_probs"] for i in members], axis=0)
                priors[f"{eval_set}/{source}/{count} options"] = {"questions": len(members), "prior": list(prior)}
                for i in members:
                    calibrated[i] = divided(rows[i]["option_probs"], prior)
            fitted[method] = {"priors": priors}
        for row, probs in zip(rows, calibrated):
            judgement = Judgement.of_distribution(probs)
            out.append({**row, "choice": judgement.choice, "confidence": judgement.confidence, "option_probs": probs,
                        "p_unsafe": unsafe_probability(judgement.choice, judgement.confidence, probs,
                                                       row["unsafe_option"], row["num_options"])})
    return out, fitted
