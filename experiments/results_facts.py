"""The facts of RESULTS.md: the run on disk (results.json and its directories), paired differences, the targets and
the headline. Read by write_results.py (the document), compare_runs.py (a second run beside the first) and the
tests; scripts beside each other in experiments/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from safeconf import io
from safeconf.config import EvalConfig
from safeconf.evaluation.metrics import accuracy, auroc, ece, score_columns
from safeconf.evaluation.report import MISSING, percent
from safeconf.evaluation.report import number as num



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
