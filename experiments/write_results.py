"""RESULTS.md, RESULTS.html and docs/results/*.png from one run of experiments/shared_data_run.py.

    .venv/bin/python experiments/write_results.py runs/experiment

Reads RUN/results.json and the run's directories (RUN/main, RUN/models/<name>: eval/metrics.json,
eval/predictions/, sft/train.parquet, confidence/); every number in the report comes from them. Missing values
print as "n/a", with the reason where the data gives one. The report opens with the headline (SafeConf against
the best baseline, the paper's targets met or not, the reliability plot), then the detail.

The document is safeconf.evaluation.report.Document (the evaluation report's renderer: one list of blocks, as
Markdown and as self-contained HTML); the reliability and risk-coverage figures are safeconf.evaluation.plots'.
Paired differences (SafeConf minus a baseline, an ablation minus its partner) get a bootstrap interval over the
questions both were scored on, with metrics.score_columns: the same resamples for both sides.
"""

from __future__ import annotations

import argparse
import io as bytes_io
import json
import shlex
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from safeconf import io
from safeconf.config import EvalConfig
from safeconf.evaluation import plots
from safeconf.evaluation.metrics import accuracy, auroc, ece, score_columns
from safeconf.evaluation.report import GUARD_NAMES, LOWER_IS_BETTER, METRIC_NAMES, MISSING, Document, cell, percent
from safeconf.evaluation.report import number as num
from safeconf.evaluation.selective import min_accepted, selective_judgement

REPO = Path(__file__).resolve().parents[1]
FIGURES = "docs/results"  # relative to the output root: RESULTS.md links them there
DPI = 100  # the PNGs are committed: keep them small

# The paper's claim (SafeConf, EMNLP 2025 Findings; issue 12's targets), not a measurement.
TARGET_ACCURACY_GAIN = 0.059  # SafeConf accuracy >= best baseline + 5.9 points
TARGET_GENERAL_DROP = 0.02  # general ability no more than 2 points below the base model's
TARGET_OVER_REFUSAL_MOVE = 0.05  # issue 20: fine-tuning moves over-refusal by at most 5 points
MAIN = "safeconf"  # the main model in results.json "models", and the SafeConf method's name
NA = MISSING
# Error rates a reader may accept, besides the run's eval.alpha: which of them each method can guarantee.
LOOSER_ALPHAS = (0.2, 0.3, 0.4)
TABLE_METRICS = ["accuracy", "ece", "l2_ece", "brier", "brier_resolution", "auroc", "sharpness", "aurc"]
NA_REASONS = (
    "n/a in a table: AUROC is undefined when every answer is right or every answer is wrong; F1 (unsafe) and "
    "AUPRC (unsafe) are over the judgements that know their unsafe option (n(judge)), and AUPRC is undefined "
    "without an unsafe one; an interval is n/a with fewer than 2 questions or where the metric is undefined in "
    "most resamples; a paired difference is n/a where the predictions of either side are not in the run "
    "directory."
)


# --- formatting ---


def points(value, ci=None) -> str:
    """A difference of two shares in percentage points: '+5.9 points [-1.2, +12.0]'."""
    if value is None:
        return NA
    text = f"{100 * value:+.1f} points"
    return text + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")


def signed(value, ci=None) -> str:
    if value is None:
        return NA
    return f"{value:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def value_of(entry: dict | None, split: str, metric: str):
    found = ((entry or {}).get(split) or {}).get(metric) or {}
    return found.get("value")


def verdicts(entry: dict) -> str:
    """'93.4% of 560': the share of questions whose verdict did not flip on any rule variant."""
    found = entry.get("verdict_consistency")
    return f"{percent(found['share'])} of {found['n']}" if found else NA


def method_note(entry: dict) -> str:
    """Degenerate and fallback, as metrics.json states them."""
    parts = []
    if entry.get("degenerate"):
        parts.append(entry["degenerate"].replace("degenerate", "DEGENERATE", 1))
    if entry.get("fallback"):
        meaning = entry.get("fallback_meaning")
        share = "" if "100% fallback" in (entry.get("degenerate") or "") else f"fallback {percent(entry['fallback'])}"
        parts.append(share + (f" ({meaning})" if meaning else "") if share else f"fallback: {meaning or NA}")
    return "; ".join(parts) or "–"


# --- the run on disk ---


class Run:
    """results.json and the run directories beside it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / "results.json"
        if not path.exists():
            raise SystemExit(f"{path} not found: run experiments/shared_data_run.py --out {self.root} first")
        self.results = json.loads(path.read_text(encoding="utf-8"))
        for key in ("baselines", "models"):
            if not isinstance(self.results.get(key), dict):
                raise SystemExit(f"{path}: field {key!r} missing or not an object")
        if MAIN not in self.results["models"] or MAIN not in self.results["models"][MAIN].get("methods", {}):
            raise SystemExit(f"{path}: models.{MAIN}.methods.{MAIN} missing (the main SafeConf model)")
        metrics_path = self.model_dir(MAIN) / "eval" / "metrics.json"
        self.metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.exists() else {}
        ev = dict(EvalConfig().__dict__)
        ev.update((self.metrics.get("config") or {}).get("eval") or {})
        self.eval = ev
        # as reported: n/a without the main metrics.json; paired differences then need predictions, absent too
        self.bootstrap_samples = self.metrics.get("bootstrap_samples")
        self._predictions: dict[Path, list[dict] | None] = {}

    def model_dir(self, name: str) -> Path:
        """Where the experiment script put the model (RUN/main, or RUN/calibration on a guard-tuned model;
        RUN/models/<name>), else the path it recorded."""
        main = "calibration" if self.results.get("calibration") else "main"
        here = self.root / (main if name == MAIN else f"models/{name}")
        if here.exists():
            return here
        recorded = self.results["models"].get(name, {}).get("out")
        return Path(recorded) if recorded and Path(recorded).exists() else here

    def predictions(self, model: str | None, method: str) -> list[dict] | None:
        """Prediction rows of the safety questions of one method (model None: a base-model baseline), or None
        when the predictions are not in the run directory."""
        role = "base" if model is None else "adapter"
        path = self.model_dir(model or MAIN) / "eval" / "predictions" / role
        if path not in self._predictions:
            self._predictions[path] = io.read_table(str(path)).to_pylist() if path.exists() else None
        rows = self._predictions[path]
        if rows is None:
            return None
        return [r for r in rows if r.get("eval_set") == "safety" and r["method"] == method]

    def sft_rows(self, model: str) -> list[dict] | None:
        path = self.model_dir(model) / "sft" / "train.parquet"
        return io.read_table(str(path)).to_pylist() if path.exists() else None

    def confidence_rows(self) -> list[dict] | None:
        path = self.model_dir(MAIN) / "confidence"
        columns = ["id", "source", "answer", "confidence", "majority_answer", "agreement", "per_mutation"]
        return io.read_table(str(path), columns=columns).to_pylist() if path.exists() else None


def paired_difference(a_rows, b_rows, bins: int, samples: int, seed: int, source: str | None = None) -> dict | None:
    """A minus B on accuracy, ECE and AUROC over the gold-labelled questions both were scored on, each with a
    paired bootstrap interval (one set of resampled questions for both), or None without predictions."""
    if a_rows is None or b_rows is None:
        return None
    a = {r["id"]: r for r in a_rows if r["answer"] is not None and (source is None or r["source"] == source)}
    b = {r["id"]: r for r in b_rows if r["answer"] is not None and (source is None or r["source"] == source)}
    ids = sorted(a.keys() & b.keys())
    if not ids:
        return None

    def columns(rows):
        return (np.array([rows[i]["confidence"] for i in ids], dtype=float),
                np.array([int(rows[i]["choice"] == rows[i]["answer"]) for i in ids], dtype=int))

    metrics = {"accuracy": lambda ca, ra, cb, rb: accuracy(ca, ra) - accuracy(cb, rb),
               "ece": lambda ca, ra, cb, rb: ece(ca, ra, bins) - ece(cb, rb, bins),
               "auroc": lambda ca, ra, cb, rb: difference(auroc(ca, ra), auroc(cb, rb))}
    found = score_columns((*columns(a), *columns(b)), metrics, samples=samples, seed=seed)
    return {"n": len(ids), **found}


def difference(a, b):
    """a - b, None where either is undefined (AUROC with only right or only wrong answers)."""
    return None if a is None or b is None else a - b


def run_difference(run: Run, a: tuple, b: tuple, source: str | None = None, split: str | None = None) -> dict | None:
    """paired_difference of (model, method) a minus b, with the run's bins, resamples and seed; `split`: the
    questions of that split only ("test": those that fitted no temperature and set no threshold)."""
    samples = run.bootstrap_samples or run.eval["bootstrap_samples"]
    a_rows, b_rows = run.predictions(*a), run.predictions(*b)
    if split:
        a_rows, b_rows = ([r for r in rows if r.get("split") == split] if rows is not None else None
                          for rows in (a_rows, b_rows))
    return paired_difference(a_rows, b_rows, run.eval["ece_bins"], samples, run.eval["seed"], source)


def base_rate_difference(run: Run) -> dict | None:
    """SafeConf minus its base-rate reference (the same answers, one constant confidence: the calibration split's
    accuracy) on the test split, where that constant is a forecast; paired, None without predictions."""
    rows = run.predictions(MAIN, MAIN)
    constant = ((run.results["models"][MAIN]["methods"][MAIN].get("base_rate") or {}).get("confidence"))
    if rows is None or constant is None:
        return None
    test = [r for r in rows if r.get("split") == "test"]
    samples = run.bootstrap_samples or run.eval["bootstrap_samples"]
    return paired_difference(test, [{**r, "confidence": constant} for r in test], run.eval["ece_bins"], samples,
                             run.eval["seed"])


def settled(ci) -> str:
    return ("n/a (no predictions)" if not ci else "the paired 95% interval lies below 0" if ci[1] < 0
            else "the paired 95% interval lies above 0" if ci[0] > 0 else "not settled: the paired 95% interval includes 0")


def base_rate_target(difference: dict | None) -> dict:
    need = "SafeConf ECE below its base-rate reference's (test split), the paired interval excluding 0"
    ece_diff = (difference or {}).get("ece") or {}
    if ece_diff.get("value") is None:
        return {"target": need, "measured": NA, "verdict": NA, "why": "no SafeConf predictions or base rate"}
    ci = ece_diff.get("ci")
    met = ece_diff["value"] < 0 and bool(ci) and ci[1] < 0
    return {"target": need, "measured": f"ECE difference {signed(ece_diff['value'], ci)} on {difference['n']} "
            "test questions", "verdict": "met" if met else "not met", "why": settled(ci)}


def auroc_target(difference: dict | None, reference: str = "token_prob") -> dict:
    need = f"SafeConf AUROC at least {reference}'s (its confidence tells right from wrong as well)"
    found = (difference or {}).get("auroc") or {}
    if found.get("value") is None:
        return {"target": need, "measured": NA, "verdict": NA, "why": f"no predictions of SafeConf or {reference}"}
    ci = found.get("ci")
    return {"target": need, "measured": f"AUROC difference {signed(found['value'], ci)} on {difference['n']} questions",
            "verdict": "met" if found["value"] >= 0 else "not met", "why": settled(ci),
            "unsettled": bool(ci) and ci[0] <= 0 <= ci[1]}


def over_refusal_target(over_refusal: dict | None) -> dict:
    need = f"over-refusal moved by at most {100 * TARGET_OVER_REFUSAL_MOVE:.0f} points by the SafeConf fine-tune"
    results = (over_refusal or {}).get("results") or {}
    before, after = results.get("base") or {}, results.get("adapter") or {}
    moves = {m: after[m]["judged_unsafe"] - before[m]["judged_unsafe"] for m in sorted(before.keys() & after.keys())
             if before[m].get("judged_unsafe") is not None and after[m].get("judged_unsafe") is not None}
    if not moves:
        return {"target": need, "measured": NA, "verdict": NA, "why": "no over-refusal before and after"}
    measured = "; ".join(f"{m} {percent(before[m]['judged_unsafe'])} -> {percent(after[m]['judged_unsafe'])} "
                         f"({points(v)})" for m, v in moves.items())
    met = max(abs(v) for v in moves.values()) <= TARGET_OVER_REFUSAL_MOVE + 1e-12
    prompts = next(iter(before.values())).get("prompts", NA)
    why = f"{prompts} safe look-alike prompts; every method must hold"
    if all(before[m]["judged_unsafe"] == after[m]["judged_unsafe"] == 0 for m in moves):
        why += ("; DEGENERATE: no prompt is judged unsafe before or after (a model that calls every request safe), "
                "so this says nothing about how refusal moves")
    return {"target": need, "measured": measured, "verdict": "met" if met else "not met", "why": why}


# --- the headline ---


def best_baseline(baselines: dict, metric: str, split: str = "overall", lowest: bool = False) -> tuple:
    """(name, names tied with it) of the baseline with the highest (lowest) value; the first in results.json
    order wins a tie. (None, []) when no baseline has the value."""
    scored = [(m, value_of(e, split, metric)) for m, e in baselines.items()]
    scored = [(m, v) for m, v in scored if v is not None]
    if not scored:
        return None, []
    pick = (min if lowest else max)(v for _, v in scored)
    tied = [m for m, v in scored if abs(v - pick) < 1e-12]
    return tied[0], tied[1:]


def headline(results: dict, difference: dict | None = None, calibrated_difference: dict | None = None) -> dict:
    """The facts the report opens with: SafeConf vs the best baseline and the three targets' verdicts.
    `difference` is the paired_difference of SafeConf minus that baseline (its intervals), when predictions
    exist; the point differences come from the metrics either way. `calibrated_difference`: the same against the
    lowest-ECE baseline, which says whether the ECE verdict is settled at this size."""
    baselines = results["baselines"]
    safeconf = results["models"][MAIN]["methods"][MAIN]
    best, tied = best_baseline(baselines, "accuracy")
    calibrated, _ = best_baseline(baselines, "ece", lowest=True)
    facts = {"best": best, "tied": tied, "best_calibrated": calibrated, "n": (safeconf.get("overall") or {}).get("n"),
             "baselines": list(baselines), "safeconf": safeconf}
    for metric in ("accuracy", "ece"):
        ours = value_of(safeconf, "overall", metric)
        theirs = value_of(baselines.get(best), "overall", metric)
        diff = None if ours is None or theirs is None else ours - theirs
        ci = ((difference or {}).get(metric) or {}).get("ci")
        facts[metric] = {"safeconf": (safeconf.get("overall") or {}).get(metric),
                         "best": ((baselines.get(best) or {}).get("overall") or {}).get(metric),
                         "difference": diff, "difference_ci": ci}
    facts["targets"] = {"accuracy": accuracy_target(facts), "ece": ece_target(baselines, safeconf, calibrated_difference),
                        "general": general_target(results.get("general_ability"))}
    for key, short in (("accuracy", f"accuracy +{100 * TARGET_ACCURACY_GAIN:.1f} points over the best baseline"),
                       ("ece", "ECE below every baseline"),
                       ("general", f"general ability within {100 * TARGET_GENERAL_DROP:.0f} points")):
        facts["targets"][key]["short"] = short
    return facts


def verdict_line(facts: dict) -> str:
    """One sentence a reader can act on: who is ahead on accuracy and ECE, and the three verdicts."""
    acc, err, best = facts["accuracy"]["difference"], facts["ece"]["difference"], facts["best"]
    if acc is None:
        lead = "SafeConf cannot be compared with the best baseline on accuracy (n/a)"
    elif abs(acc) < 1e-12:
        lead = f"SafeConf is level with {best} in accuracy"
    else:
        lead = f"SafeConf is {100 * abs(acc):.1f} points {'above' if acc > 0 else 'below'} {best} in accuracy"
    if err is not None:
        lead += (f" and {'better' if err < 0 else 'worse' if err > 0 else 'as well'} calibrated than it (ECE "
                 f"{signed(err)})")
    verdicts = "; ".join(f"{v['short']}: {v['verdict'].upper()}"
                         + (" (on the point estimates; not settled at this size)" if v.get("unsettled") else "")
                         for v in facts["targets"].values())
    return f"In short: {lead}, on {facts['n']} held-out questions. The targets: {verdicts}."


def accuracy_target(facts: dict) -> dict:
    diff, ci = facts["accuracy"]["difference"], facts["accuracy"]["difference_ci"]
    need = f"SafeConf accuracy >= best baseline's + {100 * TARGET_ACCURACY_GAIN:.1f} points"
    if diff is None:
        return {"target": need, "measured": NA, "verdict": NA,
                "why": "no accuracy for SafeConf or for any baseline in results.json"}
    met = diff >= TARGET_ACCURACY_GAIN - 1e-12
    why = ""
    if ci:
        where = ("above" if ci[0] >= TARGET_ACCURACY_GAIN else "below" if ci[1] < TARGET_ACCURACY_GAIN
                 else "across")
        why = (f"the paired 95% interval of the difference lies {where} the target"
               + (" (not settled at this size)" if where == "across" else ""))
    return {"target": need, "measured": f"{points(diff, ci)} against {facts['best']}", "verdict":
            "met" if met else "not met", "why": why, "unsettled": bool(ci) and where == "across"}


def ece_target(baselines: dict, safeconf: dict, calibrated_difference: dict | None = None) -> dict:
    """SafeConf's ECE below every baseline's; a method fitted on the calibration split (a temperature) is also
    compared on the test split alone, where its fit did not see the questions. The verdict is on point estimates;
    the paired interval against the lowest baseline says whether it is settled."""
    need = "SafeConf ECE below every baseline's, temperature scaling included"
    ours = value_of(safeconf, "overall", "ece")
    if ours is None:
        return {"target": need, "measured": NA, "verdict": NA, "why": "SafeConf has no ECE in results.json"}
    lower, missing, checks = [], [], []
    for method, entry in baselines.items():
        theirs = value_of(entry, "overall", "ece")
        if theirs is None:
            missing.append(method)
            continue
        checks.append(method)
        if theirs <= ours:
            lower.append(f"{method} {theirs:.3f}")
        if "temperature" in (entry.get("calibration") or {}):
            ours_test, theirs_test = value_of(safeconf, "test", "ece"), value_of(entry, "test", "ece")
            if ours_test is not None and theirs_test is not None and theirs_test <= ours_test:
                lower.append(f"{method} {theirs_test:.3f} on the test split (SafeConf {ours_test:.3f})")
    best = min((value_of(baselines[m], "overall", "ece"), m) for m in checks) if checks else None
    measured = f"SafeConf {ours:.3f}" + (f"; lowest baseline {best[1]} {best[0]:.3f}" if best else "")
    why = ("at or below SafeConf's: " + ", ".join(lower)) if lower else "below all " + str(len(checks))
    if missing:
        why += f"; no ECE for {', '.join(missing)} (not compared)"
    ci = ((calibrated_difference or {}).get("ece") or {}).get("ci")
    if best and ci:
        diff = ((calibrated_difference or {}).get("ece") or {}).get("value")
        settled = ("settled: the interval lies below 0" if ci[1] < 0 else "settled: the interval lies above 0"
                   if ci[0] > 0 else "not settled at this size: the interval includes 0")
        why += f"; paired difference against {best[1]}: {signed(diff, ci)}, {settled}"
    return {"target": need, "measured": measured, "verdict": "not met" if lower or not checks else "met", "why": why,
            "unsettled": bool(ci) and ci[0] <= 0 <= ci[1]}


def general_target(general: dict | None) -> dict:
    need = f"general ability no more than {100 * TARGET_GENERAL_DROP:.0f} points below the base model's"
    if not general or "skipped" in general or not general.get("results"):
        why = (general or {}).get("skipped") or "results.json has no general_ability results"
        return {"target": need, "measured": NA, "verdict": NA, "why": why}
    base, tuned = general["results"].get("base", {}), general["results"].get("adapter", {})
    parts, drops = [], []
    for method in base:
        before = (base[method].get("overall") or {}).get("value")
        after = ((tuned.get(method) or {}).get("overall") or {}).get("value")
        if before is None or after is None:
            parts.append(f"{method}: {num(before)} -> {num(after)} (not compared)")
            continue
        drops.append(before - after)
        parts.append(f"{method}: {before:.3f} -> {after:.3f} ({points(after - before)})")
    if not drops:
        return {"target": need, "measured": "; ".join(parts) or NA, "verdict": NA,
                "why": "no method has general-ability accuracy before and after fine-tuning"}
    n = (next(iter(base.values())).get("overall") or {}).get("n")
    met = max(drops) <= TARGET_GENERAL_DROP + 1e-12
    intervals = [(entry.get("overall") or {}).get("ci") for entry in base.values()]
    widths = [high - low for low, high in filter(None, intervals)]
    return {"target": need, "measured": "; ".join(parts), "verdict": "met" if met else "not met",
            "why": f"{n} general-ability questions ({general.get('data')}); every method must hold"
            + (f"; on point estimates: the accuracies' 95% intervals are up to {100 * max(widths):.0f} points wide at this "
               f"size, so a {100 * TARGET_GENERAL_DROP:.0f}-point change is not resolved" if widths and
               max(widths) > 2 * TARGET_GENERAL_DROP else "")}


# --- figures ---


def png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def scores_of(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    gold = [r for r in rows if r["answer"] is not None]
    return (np.array([r["confidence"] for r in gold], dtype=float),
            np.array([int(r["choice"] == r["answer"]) for r in gold], dtype=int))


def learning_curve_figure(points_: list[dict], references: dict) -> bytes:
    """Accuracy and ECE of each method against the training questions, bootstrap intervals as error bars;
    dashed: the best baseline's accuracy and the best-calibrated baseline's ECE."""
    figure = Figure(figsize=(8.4, 3.4), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "ece")):
        methods = sorted({m for p in points_ for m in p["methods"]})
        for method in methods:
            xs, ys, lows, highs = [], [], [], []
            for p in points_:
                entry = ((p["methods"].get(method) or {}).get("overall") or {}).get(metric) or {}
                if entry.get("value") is None:
                    continue
                ci = entry.get("ci") or [entry["value"]] * 2
                xs.append(p["questions"])
                ys.append(entry["value"])
                # a bootstrap percentile interval can miss its own point estimate (ECE is biased); draw from the point
                lows.append(max(0.0, entry["value"] - ci[0]))
                highs.append(max(0.0, ci[1] - entry["value"]))
            if xs:
                ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=method)
        name, value = references.get(metric, (None, None))
        if value is not None:
            ax.axhline(value, linestyle="--", color="gray", linewidth=1, label=f"{name} (base)")
        ax.set(xlabel="training questions", ylabel=METRIC_NAMES[metric],
               title=f"{METRIC_NAMES[metric]} vs training size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return png(figure)


def by_source_figure(sources: list[str], series: dict[str, dict]) -> bytes:
    """Per data set, accuracy and ECE of each series (label -> by_source entries), with their intervals."""
    figure = Figure(figsize=(max(6.0, 1.3 * len(sources) + 2), 3.4), layout="constrained")
    axes = figure.subplots(1, 2)
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(sources))
    for ax, metric in zip(axes, ("accuracy", "ece")):
        for i, (label, by_source) in enumerate(series.items()):
            values, errors = [], [[], []]
            for s in sources:
                entry = (by_source.get(s) or {}).get(metric) or {}
                v, ci = entry.get("value"), entry.get("ci")
                values.append(np.nan if v is None else v)
                errors[0].append(0 if v is None or not ci else max(0.0, v - ci[0]))  # as in the curve figure
                errors[1].append(0 if v is None or not ci else max(0.0, ci[1] - v))
            ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, yerr=errors, capsize=2, label=label)
        ax.set_xticks(x, sources, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=METRIC_NAMES[metric], title=f"{METRIC_NAMES[metric]} per data set", ylim=(0, 1))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    return png(figure)


def sft_figure(confidences: dict[str, list[float]]) -> bytes:
    """Histogram of the confidence in each model's SFT targets."""
    figure = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = figure.subplots()
    edges = np.linspace(0, 1, 11)
    for i, (model, values) in enumerate(confidences.items()):
        ax.hist(values, bins=edges, histtype="bar" if i == 0 else "step", linewidth=1.5, alpha=0.6 if i == 0 else 1,
                label=f"{model} ({len(values)})")
    ax.set(xlim=(0, 1), xlabel="confidence in the SFT target", ylabel="training examples",
           title="What the confidence labels looked like")
    ax.legend(fontsize=7)
    return png(figure)


# --- the report ---


class Report:
    def __init__(self, run: Run):
        self.run = run
        self.results = run.results
        self.doc = Document()
        self.figures: dict[str, bytes] = {}  # "docs/results/x.png" -> bytes
        self.models = self.results["models"]

    def figure(self, name: str, data: bytes, caption: str):
        path = f"{FIGURES}/{name}"
        self.figures[path] = data
        self.doc.image(path, caption)

    def build(self) -> Document:
        diff = run_difference(self.run, (MAIN, MAIN), (None, self._best()))
        calibrated = best_baseline(self.results["baselines"], "ece", lowest=True)[0]
        self.facts = headline(self.results, diff, run_difference(self.run, (MAIN, MAIN), (None, calibrated))
                              if calibrated else None)
        # issue 20's targets: what a constant forecaster cannot pass, and what a guard user meets
        targets = self.facts["targets"]
        targets["base_rate"] = {**base_rate_target(base_rate_difference(self.run)),
                                "short": "ECE below the base-rate reference"}
        targets["auroc"] = {**auroc_target(run_difference(self.run, (MAIN, MAIN), (None, "token_prob"))),
                            "short": "AUROC at least token_prob's"}
        targets["over_refusal"] = {**over_refusal_target(self.results.get("over_refusal")),
                                   "short": f"over-refusal within {100 * TARGET_OVER_REFUSAL_MOVE:.0f} points"}
        self.doc.heading("Results: SafeConf against its baselines on "
                         + ("a guard-tuned model" if self.base_label() == "guard" else "the base model")
                         + ", on public safety data", 1)
        self.doc.paragraph(f"Generated by experiments/write_results.py from {self.run.root}/results.json and the "
                           "run's directories; every number below is read from them.")
        self._headline()
        self._warnings()
        self._guard()
        self._methods()
        self._learning_curve()
        self._ablations()
        self._selective()
        self._general_and_refusal()
        self._labels()
        self._token_prob_check()
        self.provenance_start = len(self.doc.blocks)  # where a comparison with a second run goes (write)
        self._provenance()
        return self.doc

    def _best(self):
        return best_baseline(self.results["baselines"], "accuracy")[0]

    # 1. headline
    def _headline(self):
        f, doc = self.facts, self.doc
        doc.heading("Headline")
        acc, err = f["accuracy"], f["ece"]
        tie = f" (tied with {', '.join(f['tied'])})" if f["tied"] else ""
        held = self.results.get("sizes", {}).get((self.results.get("calibration") or {}).get("heldout", "heldout"))
        doc.paragraph(verdict_line(f))
        doc.paragraph(
            f"On {f['n'] if f['n'] is not None else NA} gold-labelled held-out questions"
            + (f" (of {held} held out)" if held is not None and held != f["n"] else "")
            + f", SafeConf (the fine-tuned model, method {MAIN}) against the best baseline, {f['best']}{tie} (the "
            f"highest overall accuracy of the {len(f['baselines'])} base-model methods: {', '.join(f['baselines'])}). "
            f"Accuracy: SafeConf {cell(acc['safeconf'])}, {f['best']} {cell(acc['best'])}; difference "
            f"{points(acc['difference'], acc['difference_ci'])}. ECE (lower is better): SafeConf "
            f"{cell(err['safeconf'])}, {f['best']} {cell(err['best'])}; difference "
            f"{signed(err['difference'], err['difference_ci'])}. "
            f"Point estimate [bootstrap 95% interval, {self.run.bootstrap_samples or NA} resamples]; the differences' "
            "intervals are paired (the same resampled questions for both)"
            + ("" if acc["difference_ci"] else ", n/a where the predictions are not in the run directory") + "."
        )
        rows = [[t["target"], t["measured"], t["verdict"].upper(), t["why"] or "–"]
                for t in f["targets"].values()]
        doc.table(["the paper's target", "measured", "verdict", "detail"], rows)
        if f["safeconf"].get("degenerate"):
            doc.paragraph(f"SafeConf's confidence is {f['safeconf']['degenerate']}: it cannot tell its right answers "
                          "from its wrong ones on this run.")
        refusal = (self.results.get("over_refusal") or {}).get("results") or {}
        before, after = refusal.get("base") or {}, refusal.get("adapter") or {}
        changes = [f"{m} {percent(before[m].get('judged_unsafe'))} -> {percent(after[m].get('judged_unsafe'))}"
                   for m in sorted(before.keys() & after.keys())]
        if changes:
            doc.paragraph("Over-refusal, not a target of the paper but what a guard user meets: safe look-alike "
                          "prompts judged unsafe before -> after fine-tuning: " + "; ".join(changes)
                          + " (section General ability and over-refusal).")
        self._reliability()

    def _reliability(self):
        f = self.facts
        wanted = {f"SafeConf ({MAIN})": (MAIN, MAIN), f"best baseline: {f['best']}": (None, f["best"])}
        if f["best_calibrated"] and f["best_calibrated"] != f["best"]:
            wanted[f"best-calibrated baseline: {f['best_calibrated']}"] = (None, f["best_calibrated"])
        scores, missing = {}, []
        for label, (model, method) in wanted.items():
            rows = self.run.predictions(model, method)
            if rows is None or not any(r["answer"] is not None for r in rows):
                missing.append(label)
            else:
                scores[label] = scores_of(rows)
        if missing:
            self.doc.paragraph(f"Reliability plot: n/a for {', '.join(missing)} (no predictions in "
                               f"{self.run.root}/main/eval/predictions).")
        if scores:
            self.figure("reliability.png", plots.reliability_diagrams(scores, self.run.eval["ece_bins"]),
                        "Reliability: SafeConf, the best baseline (accuracy) and the best-calibrated baseline (ECE), "
                        "on the held-out questions")

    def _warnings(self):
        warnings, notes = self.results.get("warnings") or [], self.results.get("notes") or []
        if warnings:
            self.doc.heading("Read with these warnings (from the evaluation)")
            for w in warnings:
                self.doc.paragraph("- " + w)
        if notes:
            self.doc.heading("Notes on the methods (from the evaluation)", 3)
            for n in notes:
                self.doc.paragraph("- " + n)

    # 2. tables
    def base_label(self) -> str:
        """What the baselines ran on: the guard-tuned model, or the untrained base model."""
        return "guard" if (self.results.get("model") or {}).get("guard_tuned") else "base"

    def rows(self):
        """(model label, model name or None, method, entry) of the untrained model's baselines (when the baselines
        ran on a guard-tuned model), every baseline, then every model's methods."""
        if self.base_label() == "guard":
            for method, entry in ((self.results.get("base_model") or {}).get("methods") or {}).items():
                yield "untrained", None, method, entry
        for method, entry in self.results["baselines"].items():
            yield self.base_label(), None, method, entry
        for name, model in self.models.items():
            for method, entry in model["methods"].items():
                yield name, name, method, entry

    def _metric_row(self, entry: dict | None, guard: bool = True) -> list[str]:
        entry = entry or {}
        cells = [str(entry.get("n", NA))] + [cell(entry.get(k)) for k in TABLE_METRICS]
        if guard:
            cells += [str(entry.get("guard_n", NA))] + [cell(entry.get(k)) for k in GUARD_NAMES]
        return cells

    def _metric_header(self, guard: bool = True) -> list[str]:
        header = ["n"] + [METRIC_NAMES[k] for k in TABLE_METRICS]
        return header + (["n(judge)"] + list(GUARD_NAMES.values()) if guard else [])

    def _methods(self):
        doc = self.doc
        doc.heading("Every method and ablation, overall")
        estimators = self.results.get("estimators") or {}
        doc.paragraph(f"Point estimate [bootstrap 95% interval, {self.run.bootstrap_samples or NA} resamples]. "
                      f"{LOWER_IS_BETTER} Model: base = the base model; otherwise the fine-tuned model's name in "
                      "results.json (safeconf = the main SafeConf model; safeconf_NN = SafeConf on NN% of the "
                      "training questions; the others are the ablations, section Ablations).")
        if estimators:
            doc.paragraph("Estimators: " + "; ".join(f"{METRIC_NAMES.get(k) or GUARD_NAMES.get(k, k)}: {v}"
                                                    for k, v in estimators.items()) + ".")
        else:
            doc.paragraph("Estimators: n/a (results.json has no 'estimators').")
        doc.paragraph(NA_REASONS)
        doc.paragraph("Under each method, its base-rate reference: the same answers with one constant confidence, "
                      "the method's accuracy on the calibration split (its AUROC is 0.5, its sharpness and Brier "
                      "resolution 0). A method whose AUROC and resolution do not beat it says nothing about single "
                      "questions, whatever its ECE. Same verdict: the share of held-out questions whose answer did "
                      "not flip on any rule variant (shuffled options, flipped polarity, restyled labels, framing).")
        rows = []
        for model, _, method, entry in self.rows():
            rows.append([model, method] + self._metric_row(entry.get("overall"))
                        + [percent(entry.get("unanswered")), verdicts(entry), method_note(entry)])
            reference = entry.get("base_rate") or {}
            if reference.get("overall"):
                rows.append(["", f"↳ base rate ({num(reference.get('confidence'))})"]
                            + self._metric_row(reference["overall"]) + ["", "", ""])
        doc.table(["model", "method"] + self._metric_header()
                  + ["unanswered", "same verdict on all variants", "degenerate / fallback"], rows)

        doc.heading("On the test split alone", 3)
        doc.paragraph("The held-out questions that neither chose the selective threshold nor fitted a temperature "
                      "(both use the calibration split): the fair comparison with token_prob_temperature, and the "
                      "split on which the base-rate reference is a forecast (its constant comes from the other).")
        rows = []
        for model, _, method, entry in self.rows():
            rows.append([model, method] + self._metric_row(entry.get("test"), guard=False))
            reference = entry.get("base_rate") or {}
            if reference.get("test"):
                rows.append(["", f"↳ base rate ({num(reference.get('confidence'))})"]
                            + self._metric_row(reference["test"], guard=False))
        doc.table(["model", "method"] + self._metric_header(guard=False), rows)

        doc.heading("Per data set")
        sources = self._sources()
        for source in sources:
            doc.heading(source, 3)
            doc.table(["model", "method"] + self._metric_header(),
                      [[model, method] + self._metric_row((entry.get("by_source") or {}).get(source))
                       for model, _, method, entry in self.rows()])

    def _sources(self) -> list[str]:
        found = []
        for _, _, _, entry in self.rows():
            found += [s for s in entry.get("by_source") or {} if s not in found]
        return found

    # guard-tuning
    def _guard(self):
        guard = self.results.get("guard")
        if not guard:
            return
        doc = self.doc
        doc.heading("Guard-tuning: the knowledge SafeConf starts from")
        pool, train = guard.get("pool") or {}, guard.get("train") or {}
        doc.paragraph(
            f"Plain supervised fine-tuning of the base model on the gold answers of a pool disjoint from the "
            f"training and held-out questions (the guard stage, safeconf/guard.py): {pool.get('read', NA)} pool "
            f"questions read, {pool.get('rejected', NA)} rejected, left out {json.dumps(pool.get('left_out') or {})}; "
            f"examples {json.dumps(pool.get('examples') or {})}. Training: {train.get('steps', NA)} steps, "
            f"{train.get('train_tokens', NA)} tokens at {num(train.get('tokens_per_s'), 1)} tokens/s in "
            f"{train.get('precision', NA)}, {num(train.get('seconds'), 0)} s; final train loss "
            f"{num(train.get('final_train_loss'))}. The curve: the guard adapter at each point (adapter_token_prob, its "
            "option probability on the prompt it was trained on) on the curve's held-out questions (every set); "
            "0 examples is the untrained model's token_prob on the same questions.")
        points_ = sorted(guard.get("curve") or [], key=lambda p: p["examples"])
        sources = sorted({s for p in points_ for s in p.get("by_source") or {}})
        rows = []
        for p in points_:
            rows.append([str(p["examples"]), cell((p.get("overall") or {}).get("accuracy")),
                         cell((p.get("overall") or {}).get("auroc"))]
                        + [cell(((p.get("by_source") or {}).get(s) or {}).get("accuracy")) for s in sources]
                        + [verdicts(p)])
        doc.table(["pool examples trained", "accuracy", "AUROC"] + [f"accuracy: {s}" for s in sources]
                  + ["same verdict on all variants"], rows)
        calibration = self.results.get("calibration")
        if calibration:
            sizes = self.results.get("sizes") or {}
            doc.paragraph(
                f"The calibration experiment (every section below) runs on the sets guard-tuning taught: "
                f"{', '.join(calibration['sets'])}, chosen from this curve (a set is kept when the final guard "
                "model's held-out accuracy interval lies above chance; experiments/shared_data_run.py "
                "CALIBRATION_SETS). The others were not learned by this 135M model and are left out of it. "
                f"Because the choice was made on the curve's held-out questions, the experiment trains on "
                f"{sizes.get(calibration['train'], NA)} questions and is evaluated on a fresh draw of "
                f"{sizes.get(calibration['heldout'], NA)} held-out questions that the curve never saw.")

    # 3. learning curve
    def curve_models(self) -> list[str]:
        """The SafeConf models with the default SFT settings (no ablation settings), smallest first."""
        names = [n for n, m in self.models.items() if not m.get("sft_settings") and MAIN in m["methods"]]
        return sorted(names, key=lambda n: (self.models[n].get("train_fraction") or 0, n))

    def _learning_curve(self):
        doc = self.doc
        doc.heading("Learning curve")
        names = self.curve_models()
        methods = list(dict.fromkeys(m for name in names for m in self.models[name]["methods"]))
        rows, series = [], []
        for name in names:
            m = self.models[name]
            train = m.get("train") or {}
            trained = ((train.get("examples") or {}).get("train") or {}).get("kept")
            rows.append([name, percent(m.get("train_fraction")), str(m.get("train_questions", NA)),
                         str(trained if trained is not None else NA), str(train.get("steps", NA))]
                        + [cell(((m["methods"].get(method) or {}).get("overall") or {}).get(k))
                           for method in methods for k in ("accuracy", "ece")])
            series.append({"questions": m.get("train_questions"), "methods": m["methods"]})
        doc.paragraph("SafeConf fine-tuned on nested subsets of the training questions (each smaller set is part of "
                      "the larger; the 100% point is the main model), evaluated on the same held-out questions. "
                      "Training questions include the SFT validation split; examples trained: the SFT train split.")
        doc.table(["model", "share of training questions", "training questions", "examples trained", "steps"]
                  + [f"{method} {METRIC_NAMES[k]}" for method in methods for k in ("accuracy", "ece")], rows)
        if len(names) < 2:
            doc.paragraph(f"Only {len(names)} training size in this run: no curve to draw.")
        if len(names) >= 2 and all(p["questions"] is not None for p in series):
            baselines = self.results["baselines"]
            refs = {}
            best = self.facts["best"]
            if best:
                refs["accuracy"] = (best, value_of(baselines[best], "overall", "accuracy"))
            calibrated = self.facts["best_calibrated"]
            if calibrated:
                refs["ece"] = (calibrated, value_of(baselines[calibrated], "overall", "ece"))
            self.figure("learning_curve.png", learning_curve_figure(series, refs),
                        "Accuracy and ECE against the number of training questions (dashed: the best base-model "
                        "baseline)")

    # 4. ablations
    def partner(self, name: str) -> tuple[str | None, str]:
        """The SafeConf model trained on the same questions, and where that pairing comes from."""
        model = self.models[name]
        if "compare_with" in model:
            return model["compare_with"], "compare_with in results.json"
        same = [n for n in self.curve_models() if self.models[n].get("train_questions") == model.get("train_questions")]
        return (same[0] if same else None), "derived: results.json has no compare_with; the SafeConf model with the " \
                                            "same number of training questions"

    def _ablations(self):
        doc = self.doc
        doc.heading("Ablations")
        ablations = [n for n in self.models if n not in self.curve_models()]
        if not ablations:
            doc.paragraph("No ablation in this run: its command left them out (--ablations; section How this run was made).")
            return
        doc.paragraph("Each ablation changes one SFT setting and is compared with SafeConf trained on the same "
                      "training questions (its compare_with), method by method; a method the ablation lacks "
                      "(no_confidence states no confidence) is compared through the methods it has. Difference: "
                      "ablation minus SafeConf, with a paired bootstrap 95% interval over the held-out questions.")
        rows = []
        for name in ablations:
            model = self.models[name]
            partner, source = self.partner(name)
            settings = ", ".join(f"sft.{k}={v}" for k, v in (model.get("sft_settings") or {}).items()) or "–"
            doc.paragraph(f"- {name} ({settings}): {model.get('description', '')}; {model.get('train_questions', NA)} "
                          f"training questions; compared with {partner or NA} ({source}"
                          + ("" if partner else "; no SafeConf model was trained on that many questions") + ").")
            if not partner:
                continue
            theirs = self.models[partner]["methods"]
            for method, entry in model["methods"].items():
                against = [method] if method in theirs else []
                if MAIN in theirs and MAIN not in model["methods"]:
                    against.append(MAIN)  # its stand-in against SafeConf's own method
                for other in against:
                    diff = run_difference(self.run, (name, method), (partner, other))
                    for metric in ("accuracy", "ece"):
                        a = (entry.get("overall") or {}).get(metric)
                        b = (theirs[other].get("overall") or {}).get(metric)
                        d = None if not a or not b or a.get("value") is None or b.get("value") is None \
                            else a["value"] - b["value"]
                        ci = ((diff or {}).get(metric) or {}).get("ci")
                        rows.append([name, method, f"{partner} / {other}", METRIC_NAMES[metric], cell(a), cell(b),
                                     points(d, ci) if metric == "accuracy" else signed(d, ci),
                                     str((diff or {}).get("n", NA))])
        if rows:
            doc.table(["ablation", "method", "compared with", "metric", "ablation", "SafeConf", "difference",
                       "paired n"], rows)

    # 5. selective
    def _selective(self):
        doc = self.doc
        doc.heading("Selective judgement: threshold and coverage")
        entries = [(model, method, e) for model, _, method, e in self.rows() if e.get("selective")]
        if not entries:
            doc.paragraph("n/a: no method has a 'selective' section in its metrics.")
            return
        first = entries[0][2]["selective"]
        need = min_accepted(first["alpha"], first["delta"])
        doc.paragraph(
            f"A judgement is accepted when its confidence reaches the threshold, chosen on the calibration split "
            f"({first['calibration_questions']} questions) so that the error rate of accepted judgements is at most "
            f"alpha = {first['alpha']} with probability at least 1 - delta = {1 - first['delta']:.2f} (Clopper-"
            f"Pearson bound, fixed-sequence testing); any threshold needs at least {need} accepted calibration "
            f"questions. Coverage and error are measured on the test split ({first['test_questions']} questions). "
            "No threshold: every judgement is deferred (the endpoint too).")
        rows = []
        for model, method, e in entries:
            s = e["selective"]
            why = "–"
            if s.get("threshold") is None:
                why = (f"no threshold: the calibration split has {s['calibration_questions']} questions, fewer than "
                       f"the {min_accepted(s['alpha'], s['delta'])} any threshold needs"
                       if s["calibration_questions"] < min_accepted(s["alpha"], s["delta"]) else
                       "no threshold: no confidence level keeps the error bound at or under alpha")
            rows.append([model, method, num(s.get("threshold"), 2),
                         f"{s.get('calibration_accepted', NA)} / {s.get('calibration_errors', NA)}",
                         num(s.get("calibration_upper_bound")), f"{s.get('test_accepted', NA)} / "
                         f"{s.get('test_questions', NA)}", percent(s.get("test_coverage")),
                         percent(s.get("test_error")), why])
        doc.table(["model", "method", "threshold", "calibration accepted / wrong", "error bound", "test accepted",
                   "test coverage", "test error", "why"], rows)
        self._looser_alphas(entries, first["alpha"], first["delta"])
        scores = {}
        for model, name, method, _ in self.rows():
            if model != "base" and name != MAIN:
                continue
            rows_ = self.run.predictions(name, method)
            if rows_ and any(r["answer"] is not None for r in rows_):
                scores[method if model == "base" else f"{model}/{method}"] = scores_of(rows_)
        if scores:
            self.figure("risk_coverage.png", plots.risk_coverage_curves(scores),
                        "Risk-coverage on the held-out questions: the base-model baselines and the main SafeConf model")

    def _looser_alphas(self, entries, alpha: float, delta: float):
        """The same threshold rule at looser error rates, from the predictions: where no method can guarantee
        the run's alpha, the reader still sees which one guarantees the most, and at what coverage."""
        alphas = [a for a in LOOSER_ALPHAS if a > alpha]
        rows = []
        for model, method, _ in entries:
            preds = self.run.predictions(None if model == "base" else model, method)
            if not preds:
                continue
            split = {name: [r for r in preds if r["split"] == name and r["answer"] is not None]
                     for name in ("calibration", "test")}
            cells = []
            for a in alphas:
                found = selective_judgement(*scores_of(split["calibration"]), *scores_of(split["test"]), a, delta)
                cells.append("none" if found["threshold"] is None else
                             f"{num(found['threshold'], 2)}: {percent(found['test_coverage'])} covered, "
                             f"{percent(found['test_error'])} wrong")
            rows.append([model, method] + cells)
        if not rows:
            return
        self.doc.paragraph(f"The same rule (delta = {delta}) at looser error rates, recomputed from the predictions: "
                           "the threshold chosen on the calibration split, then the test split's coverage and error "
                           "at that threshold (none: no threshold keeps the bound at or under that alpha).")
        self.doc.table(["model", "method"] + [f"alpha = {a}" for a in alphas], rows)

    # 6. general ability and over-refusal
    def _general_and_refusal(self):
        doc = self.doc
        doc.heading("General ability and over-refusal, before and after fine-tuning")
        general = self.results.get("general_ability")
        if not general or "skipped" in general or not general.get("results"):
            doc.paragraph("General ability: n/a (" + ((general or {}).get("skipped") or "no results") + ").")
        else:
            doc.paragraph(f"Accuracy on {general.get('data')} (base = before, adapter = the main SafeConf model, "
                          "after; verbalized: the greedy reply's answer; token_prob: the likeliest option label).")
            base, tuned = general["results"].get("base", {}), general["results"].get("adapter", {})
            langs = sorted({k for methods in general["results"].values() for v in methods.values() for k in v
                            if k not in ("overall", "unanswered")})
            rows = []
            for method in sorted(set(base) | set(tuned)):
                before, after = base.get(method) or {}, tuned.get(method) or {}
                b, a = (before.get("overall") or {}).get("value"), (after.get("overall") or {}).get("value")
                rows.append([method, str((before.get("overall") or {}).get("n", NA)), cell(before.get("overall")),
                             cell(after.get("overall")), points(None if a is None or b is None else a - b)]
                            + [f"{cell(before.get(lang))} -> {cell(after.get(lang))}" for lang in langs]
                            + [f"{percent(before.get('unanswered'))} -> {percent(after.get('unanswered'))}"])
            doc.table(["method", "n", "before", "after", "change"] + [f"{lang} before -> after" for lang in langs]
                      + ["unanswered before -> after"], rows)
        refusal = self.results.get("over_refusal")
        if not refusal or "skipped" in refusal or not refusal.get("results"):
            doc.paragraph("Over-refusal: n/a (" + ((refusal or {}).get("skipped") or "no results") + ").")
            return
        doc.paragraph(f"Over-refusal: safe look-alike prompts from {refusal.get('data')} judged unsafe (lower is "
                      "better), before (base) and after (adapter) fine-tuning.")
        base, tuned = refusal["results"].get("base", {}), refusal["results"].get("adapter", {})
        rows = []
        for method in sorted(set(base) | set(tuned)):
            before, after = base.get(method) or {}, tuned.get(method) or {}
            b, a = before.get("judged_unsafe"), after.get("judged_unsafe")
            rows.append([method, str(before.get("prompts", after.get("prompts", NA))), percent(b), percent(a),
                         points(None if a is None or b is None else a - b),
                         f"{percent(before.get('unreadable'))} -> {percent(after.get('unreadable'))}"])
        doc.table(["method", "prompts", "judged unsafe before", "after", "change", "unreadable before -> after"], rows)

    # 7. labels, and where SafeConf wins or loses
    def _labels(self):
        doc = self.doc
        doc.heading("What the labels looked like")
        pipeline = self.results.get("pipeline") or {}
        if pipeline:
            doc.paragraph(
                f"The pipeline sampled {pipeline.get('samples', NA)} answers for {pipeline.get('questions', NA)} "
                f"training questions (variants by mutation: {json.dumps(pipeline.get('variants_by_mutation'))}; "
                f"unreadable samples: {percent(pipeline.get('unreadable_rate'))}); mean confidence (share of sampled "
                f"answers that are right, over a question's variants): {num(pipeline.get('mean_confidence'))}.")
        confidence = self.run.confidence_rows()
        source_of = {r["id"]: r["source"] for r in confidence or []}
        sft = {}
        rows = []
        for name, model in self.models.items():
            examples = self.run.sft_rows(name)
            if examples is None:
                rows.append([name, NA, NA, NA, NA, NA, f"no SFT set at {self.run.model_dir(name)}/sft"])
                continue
            values = [e["confidence"] for e in examples if e.get("confidence") is not None]
            if not values:
                settings = model.get("sft_settings") or {}
                rows.append([name, str(len(examples)), NA, NA, NA, NA, "no confidence in the target"
                             + (f" ({', '.join(f'sft.{k}={v}' for k, v in settings.items())})" if settings else "")])
                continue
            sft[name] = values
            counts = np.histogram(values, bins=np.linspace(0, 1, 11))[0]
            values = np.array(values)
            rows.append([name, str(len(examples)), num(float(values.mean())), num(float(np.median(values))),
                         percent(float(np.mean(values >= 0.9))), percent(float(np.mean(values <= 0.1))),
                         " ".join(str(c) for c in counts)])
        doc.paragraph("Confidence in each model's SFT targets (the train split it was trained on). Histogram: "
                      "counts in the bins 0-0.1, 0.1-0.2, ..., 0.9-1.0.")
        doc.table(["model", "examples", "mean confidence", "median", ">= 0.9", "<= 0.1", "histogram / note"], rows)
        if sft:
            self.figure("sft_confidence.png", sft_figure(sft), "Confidence in the SFT targets, per model")
        if confidence:
            self._labels_by_mutation(confidence)
            self._labels_by_source(confidence, source_of)
        self._wins()

    def _labels_by_mutation(self, confidence: list[dict]):
        """How often the sampled answers were right on each kind of variant: a model that answers by the options'
        position or wording, not their meaning, is right on the original and wrong on the shuffled or flipped."""
        right, total = defaultdict(int), defaultdict(int)
        for row in confidence:
            for entry in row.get("per_mutation") or []:
                right[entry["mutation"]] += entry["correct"] or 0
                total[entry["mutation"]] += entry["valid"] or 0
        if not total:
            return
        self.doc.paragraph("Share of the sampled answers that are right, per kind of variant, over the training "
                           "questions (the model the pipeline sampled from; k answers per variant):")
        self.doc.table(["variant", "answers", "right"], [[m, str(total[m]), percent(right[m] / total[m])]
                                                        for m in sorted(total, key=lambda m: (m != "original", m))])

    def _labels_by_source(self, confidence: list[dict], source_of: dict):
        groups = defaultdict(list)
        for r in confidence:
            groups[r["source"]].append(r)
        main_sft = {e["question_id"]: e.get("confidence") for e in self.run.sft_rows(MAIN) or []}
        rows = []
        for source, found in sorted(groups.items()):
            gold = [r for r in found if r["answer"] is not None]
            majority_right = [int(r["majority_answer"] == r["answer"]) for r in gold
                              if r["majority_answer"] is not None]
            trained = [c for q, c in main_sft.items() if source_of.get(q) == source and c is not None]
            rows.append([source, str(len(found)), num(float(np.mean([r["confidence"] for r in gold]))) if gold else NA,
                         percent(float(np.mean(majority_right))) if majority_right else NA,
                         num(float(np.mean([r["agreement"] for r in found if r["agreement"] is not None])))
                         if any(r["agreement"] is not None for r in found) else NA,
                         str(len(trained)), num(float(np.mean(trained))) if trained else NA])
        self.doc.paragraph("Per data set, from the main pipeline's confidence table (all training questions): the "
                           "mean confidence (share of sampled answers that are right), how often the model's majority "
                           "answer is the gold one, the mean agreement with the majority, and the main SFT train "
                           "split's examples and mean target confidence.")
        self.doc.table(["data set", "questions", "mean confidence", "majority answer right", "mean agreement",
                        "SFT examples", "SFT mean confidence"], rows)
        by_mutation = defaultdict(Counter)
        for r in confidence:
            for m in r.get("per_mutation") or []:
                by_mutation[m["mutation"]].update({"samples": m.get("samples") or 0, "valid": m.get("valid") or 0,
                                                   "correct": m.get("correct") or 0})
        if by_mutation:
            self.doc.paragraph("Sampled answers per mutation (all training questions): share right of the readable "
                               "ones.")
            self.doc.table(["mutation", "samples", "readable", "right"],
                           [[m, str(c["samples"]), str(c["valid"]),
                             percent(c["correct"] / c["valid"]) if c["valid"] else NA]
                            for m, c in sorted(by_mutation.items())])

    def _wins(self):
        doc, f = self.doc, self.facts
        doc.heading("Where SafeConf wins and loses, per data set")
        best = f["best"]
        if not best:
            doc.paragraph("n/a: no baseline has an accuracy.")
            return
        ours = self.models[MAIN]["methods"][MAIN].get("by_source") or {}
        theirs = self.results["baselines"][best].get("by_source") or {}
        baselines = self.results["baselines"]
        rows = []
        for source in self._sources():
            a, b = ours.get(source) or {}, theirs.get(source) or {}
            diff = run_difference(self.run, (MAIN, MAIN), (None, best), source)
            here = {m: {"here": (e.get("by_source") or {}).get(source)} for m, e in baselines.items()}
            local_best, _ = best_baseline(here, "accuracy", split="here")
            cells = [source, str(a.get("n", NA))]
            for metric, fmt in (("accuracy", points), ("ece", signed)):
                va, vb = (a.get(metric) or {}).get("value"), (b.get(metric) or {}).get("value")
                d = None if va is None or vb is None else va - vb
                ci = ((diff or {}).get(metric) or {}).get("ci")
                better = (d > 0) if metric == "accuracy" else (d < 0) if d is not None else None
                verdict = NA if d is None else "tie" if abs(d) < 1e-12 else ("SafeConf" if better else best)
                cells += [cell(a.get(metric)), cell(b.get(metric)), fmt(d, ci), verdict]
            cells.append(f"{local_best} {num(value_of(here[local_best], 'here', 'accuracy'))}" if local_best else NA)
            rows.append(cells)
        doc.paragraph(f"SafeConf against {best} (the best baseline overall) on each data set; difference: SafeConf "
                      "minus the baseline, paired bootstrap 95% interval; better: which is higher in accuracy, lower "
                      "in ECE. Last column: the baseline with the highest accuracy on that data set.")
        doc.table(["data set", "n", "SafeConf accuracy", f"{best} accuracy", "difference", "better",
                   "SafeConf ECE", f"{best} ECE", "difference", "better", "best baseline here"], rows)
        if ours and theirs:
            sources = self._sources()
            self.figure("by_source.png", by_source_figure(sources, {f"SafeConf ({MAIN})": ours,
                                                                    f"{best} (base)": theirs}),
                        f"Accuracy and ECE per data set: SafeConf and {best}")

    # 8. provenance
    def _token_prob_check(self):
        """experiments/token_prob_check.py's output, when the run directory has it: where the token-probability
        baseline's calibration comes from, factor by factor (prompt, answer prefix, label tokens)."""
        path = self.run.root / "token_prob_check.json"
        if not path.exists():
            return
        check = json.loads(path.read_text(encoding="utf-8"))
        doc = self.doc
        doc.heading("The token-probability baseline, checked")
        doc.paragraph(
            "Command: .venv/bin/python experiments/token_prob_check.py --per-set "
            f"{check.get('per_set')} --out {path} (the base model, engine hf; its own seeded question draw: dev from "
            "the train splits, held-out from the dev/val splits). Each row scores the same questions with one "
            "prompt, answer prefix and label-token rule. The evaluated token_prob is prompt=scoring "
            "prefix=by_language labels=project (question and options, no reply-format instruction; each label "
            "tokenised after the prefix as a reply writes it); prompt=instructed is what token_prob scored before "
            "(the reply-format instruction the verbalized method needs); prompt=plain prefix=english "
            "labels=max_space is the plain transformers script the issue compared against. Chosen on dev; held-out "
            "shown.")
        held = ((check.get("splits") or {}).get("heldout") or {}).get("rows") or {}
        ece_of = {name: r.get("ece") for name, r in held.items()}
        named = {"evaluated token_prob": "prompt=scoring prefix=by_language labels=project",
                 "token_prob before": "prompt=instructed prefix=by_language labels=project",
                 "the plain script": "prompt=plain prefix=english labels=max_space"}
        if all(ece_of.get(n) is not None for n in named.values()):
            by_prompt = {}
            for name, value in ece_of.items():
                by_prompt.setdefault(name.rsplit(" labels=", 1)[0], []).append(value)
            rule_gap = max(max(v) - min(v) for v in by_prompt.values())
            doc.paragraph("Held-out ECE: " + "; ".join(f"{label} {ece_of[n]:.3f}" for label, n in named.items())
                          + f". The label-token rule moves ECE by at most {rule_gap:.3f} for any one prompt; the "
                          "prompt moves it most: mean confidence "
                          f"{held[named['token_prob before']]['mean_confidence']:.3f} with the reply-format "
                          f"instruction, {held[named['evaluated token_prob']]['mean_confidence']:.3f} without, at "
                          f"accuracy {held[named['token_prob before']]['accuracy']:.3f} and "
                          f"{held[named['evaluated token_prob']]['accuracy']:.3f}.")
        keys = ("accuracy", "ece", "adaptive_ece", "brier", "auroc", "mean_confidence", "picks_first_option")
        for split, found in (check.get("splits") or {}).items():
            rows = [[name] + [num(r.get(k)) for k in keys] for name, r in found["rows"].items()]
            doc.paragraph(f"{split}: {found['questions']} questions, {found['seconds']} s.")
            doc.table(["configuration", "accuracy", "ECE", "adaptive ECE", "Brier", "AUROC", "mean confidence",
                       "picks the first option"], rows)

    def _provenance(self):
        doc, r = self.doc, self.results
        doc.heading("How this run was made")
        command = r.get("command")
        doc.paragraph("Command: " + (shlex.join(command) if isinstance(command, list) else str(command or NA)))
        doc.paragraph("Settings (config overrides, in order): " + (", ".join(r.get("settings") or []) or NA) + ". "
                      "Why these sizes, operators, variants and k, and what each costs: the docstring of "
                      "experiments/shared_data_run.py.")
        seeds = r.get("seeds") or {}
        doc.table(["seed", "value"], [[k, str(v)] for k, v in seeds.items()] or [[NA, NA]])
        sizes, selection = r.get("sizes") or {}, r.get("selection") or {}
        rows = []
        for split, n in sizes.items():
            by_source = (selection.get(split) or {}).get("by_source") or {}
            rows.append([split, str(n), "; ".join(f"{s} {v.get('questions')}" for s, v in by_source.items()) or NA,
                         json.dumps((selection.get(split) or {}).get("by_lang")),
                         json.dumps((selection.get(split) or {}).get("by_task"))])
        doc.table(["questions", "count", "per data set", "languages", "tasks"], rows)
        train_rows = []
        for name, m in self.models.items():
            t = m.get("train") or {}
            trained = ((t.get("examples") or {}).get("train") or {}).get("kept")
            train_rows.append([name, str(m.get("train_questions", NA)), str(trained if trained is not None else NA),
                               str(t.get("steps", NA)), num(t.get("final_train_loss")), str(t.get("precision", NA)),
                               num(t.get("tokens_per_s"), 1), num(t.get("seconds"), 1)])
        doc.table(["model", "training questions", "examples trained", "steps", "final train loss", "precision",
                   "tokens/s", "training seconds"], train_rows)
        step_rows = []
        for step, found in (r.get("steps") or {}).items():
            if isinstance(found, dict):
                for stage, v in found.items():
                    v = v or {}
                    step_rows.append([step, stage, num(v.get("stage_seconds"), 1), str(v.get("status", NA))])
            else:
                step_rows.append([step, "–", num(found, 1), "–"])
        wall = r.get("wall_seconds")
        doc.paragraph(f"Wall time: {num(wall, 1)} s" + (f" ({wall / 60:.1f} min)" if wall is not None else "")
                      + " for the whole command; per step and stage below (status 'up to date': skipped by this "
                      "command, its inputs unchanged since an earlier run in the same directory; its seconds are "
                      "that earlier run's, not part of this command's wall time).")
        doc.table(["step", "stage", "seconds", "status"], step_rows)


def write(run_dir: str | Path, root: str | Path = REPO, compare: str | Path | None = None,
          compare_label: str = "") -> dict:
    """Render the run into ROOT/RESULTS.md, ROOT/RESULTS.html and ROOT/docs/results/*.png; returns the paths and
    the headline facts. `compare`: a second run of the experiment, compared with this one on the same held-out
    questions in a section of its own (experiments/compare_runs.py), before the provenance."""
    run = Run(run_dir)
    report = Report(run)
    doc = report.build()
    if compare:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from compare_runs import add_section

        provenance = report.provenance_start
        blocks, doc.blocks = doc.blocks[provenance:], doc.blocks[:provenance]
        report.facts["compared"] = add_section(doc, run, Run(compare), compare_label or str(compare))
        doc.blocks += blocks
    root = Path(root)
    (root / FIGURES).mkdir(parents=True, exist_ok=True)
    for old in (root / FIGURES).glob("*.png"):  # the folder is this script's output: no figure of an older run stays
        if f"{FIGURES}/{old.name}" not in report.figures:
            old.unlink()
    for path, data in report.figures.items():
        (root / path).write_bytes(data)
    (root / "RESULTS.md").write_text(doc.markdown(), encoding="utf-8")
    html = doc.html(report.figures).replace("<title>SafeConf evaluation</title>", "<title>SafeConf results</title>")
    (root / "RESULTS.html").write_text(html, encoding="utf-8")
    return {"markdown": str(root / "RESULTS.md"), "html": str(root / "RESULTS.html"),
            "figures": [str(root / p) for p in report.figures], "headline": report.facts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the experiment's --out directory (holds results.json)")
    parser.add_argument("--root", default=str(REPO), help="where RESULTS.md, RESULTS.html and docs/results/ go")
    parser.add_argument("--compare", help="a second run of the experiment (its --out directory) with one thing "
                        "changed, compared with this one on the same held-out questions")
    parser.add_argument("--compare-label", default="", help="what the second run changed, for its section's title")
    args = parser.parse_args(argv)
    written = write(args.run, args.root, args.compare, args.compare_label)
    facts = written.pop("headline")
    print(json.dumps({**written, "best_baseline": facts["best"],
                      "targets": {k: v["verdict"] for k, v in facts["targets"].items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
