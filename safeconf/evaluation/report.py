"""report.md and report.html from the metrics.json summary: one list of blocks, rendered twice.

Markdown links the PNGs beside it; the HTML embeds them (base64), so it stays whole when copied alone.
"""

from __future__ import annotations

import base64
import html

from safeconf.evaluation.metrics import coverage_key
from safeconf.evaluation.selective import min_accepted

METRIC_NAMES = {
    "accuracy": "accuracy", "ece": "ECE", "adaptive_ece": "adaptive ECE", "l2_ece": "L2 ECE", "brier": "Brier",
    "brier_reliability": "Brier reliability", "brier_resolution": "Brier resolution", "auroc": "AUROC",
    "sharpness": "sharpness", "aurc": "AURC",
}
GUARD_NAMES = {"unsafe_f1": "F1 (unsafe)", "unsafe_auprc": "AUPRC (unsafe)"}
LOWER_IS_BETTER = ("ECE, adaptive ECE, L2 ECE, Brier, Brier reliability and AURC: lower is better; accuracy, "
                   "Brier resolution, AUROC, F1 and AUPRC: higher is better. Sharpness is the standard deviation of "
                   "the confidences (0 for a constant). AUROC is of confidence against correctness: the chance that "
                   "a right answer gets more confidence than a wrong one (0.5: no better than a constant).")


# The one formatting of numbers for the evaluation report and RESULTS.md (experiments/write_results.py).
MISSING = "n/a"


def number(value, digits: int = 3) -> str:
    return MISSING if value is None or value != value else f"{value:.{digits}f}"  # NaN: an undefined metric


def cell(entry: dict | None) -> str:
    """'0.612 [0.550, 0.670]' from {"value", "ci"}; n/a where the value is missing."""
    if not entry or entry.get("value") is None:
        return MISSING
    ci = entry.get("ci")
    return number(entry["value"]) + (f" [{number(ci[0])}, {number(ci[1])}]" if ci else "")


def percent(value) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


class Document:
    """Blocks: ("h", level, text), ("p", text), ("table", header, rows), ("img", file name, caption)."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2):
        self.blocks.append(("h", level, text))

    def paragraph(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def image(self, name: str, caption: str):
        self.blocks.append(("img", name, caption))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            if block[0] == "h":
                out.append("#" * block[1] + " " + block[2])
            elif block[0] == "p":
                out.append(block[1])
            elif block[0] == "table":
                _, header, rows = block
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            else:
                out.append(f"![{block[2]}]({block[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, images: dict[str, bytes]) -> str:
        out = []
        for block in self.blocks:
            if block[0] == "h":
                out.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif block[0] == "p":
                out.append(f"<p>{html.escape(block[1])}</p>")
            elif block[0] == "table":
                _, header, rows = block
                head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                data = base64.b64encode(images[block[1]]).decode("ascii")
                caption = html.escape(block[2])
                out.append(f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
                           f"<figcaption>{caption} ({html.escape(block[1])})</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto}"
                 "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f2f2f2}"
                 "img{max-width:100%}figure{margin:1.5em 0}")
        return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>SafeConf evaluation</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def build(summary: dict, plots: dict[str, str]) -> Document:
    """The report of a run; `plots` maps PNG file name -> caption."""
    doc = Document()
    doc.heading("SafeConf evaluation", 1)
    doc.paragraph(
        f"Data: {summary['data']} — {summary['questions']} questions ({summary['with_gold']} with a gold answer, "
        f"{summary['without_gold']} without: scored for confidence only, left out of accuracy and calibration); "
        f"{summary['rows_rejected']} rows rejected at the door. Model: {summary['model']}; "
        f"adapter: {summary['adapter'] or 'none'}."
    )
    _headline(doc, summary)
    doc.paragraph(_truncation_line(summary.get("truncated_prompts", {})))
    if summary.get("warnings"):
        doc.heading("Warnings")
        for warning in summary["warnings"]:
            doc.paragraph("- " + warning)
    _methods_table(doc, summary)
    _methods_table(doc, summary, split="test")
    _estimators(doc, summary)
    _posthoc(doc, summary)
    _breakdowns(doc, summary)
    _selective(doc, summary)
    _over_refusal(doc, summary)
    _general(doc, summary)
    if summary["notes"]:
        doc.heading("Notes")
        for note in summary["notes"]:
            doc.paragraph("- " + note)
    doc.heading("Plots")
    for name, caption in plots.items():
        doc.image(name, caption)
    return doc


CORE = {"accuracy": "accuracy", "ece": "ECE", "auroc": "AUROC", "brier": "Brier", "unsafe_f1": "F1 (unsafe)"}


def _value(entry: dict | None, split: str, metric: str):
    return (((entry or {}).get(split) or {}).get(metric) or {}).get("value")


def _interval(entry: dict | None, split: str, metric: str):
    return (((entry or {}).get(split) or {}).get(metric) or {}).get("ci")


def _headline(doc: Document, summary: dict):
    """What a newcomer reads first: SafeConf against the most accurate baseline and against its base-rate reference
    (the same answers with one constant confidence), what this size of data lets one conclude, and the core table."""
    methods = summary["methods"]
    baselines = {m: e for m, e in methods.items() if e["role"] == "base" and _value(e, "overall", "accuracy") is not None}
    best = max(baselines, key=lambda m: _value(baselines[m], "overall", "accuracy"), default=None)
    ours = methods.get("safeconf")
    doc.heading("Headline")
    lines = []
    if ours is None or _value(ours, "overall", "accuracy") is None:
        lines.append("SafeConf was not evaluated here (no adapter); the rows below compare the base model's methods.")
    else:
        n = ours["overall"]["n"]
        lines.append(f"SafeConf on {n} questions: accuracy {cell(ours['overall'].get('accuracy'))}, ECE "
                     f"{cell(ours['overall'].get('ece'))}, AUROC {cell(ours['overall'].get('auroc'))}.")
        if best:
            lines.append(f"Most accurate baseline, {best}: accuracy {cell(baselines[best]['overall'].get('accuracy'))}"
                         f", ECE {cell(baselines[best]['overall'].get('ece'))}, AUROC "
                         f"{cell(baselines[best]['overall'].get('auroc'))}. "
                         + _compared("accuracy", ours, baselines[best], "the baseline's"))
        reference = ours.get("base_rate") or {}
        if reference.get("test"):
            lines.append(f"Base-rate reference (SafeConf's answers, every confidence {reference['confidence']:.3f}), "
                         f"test split: ECE {cell(reference['test'].get('ece'))} against SafeConf's "
                         f"{cell((ours.get('test') or {}).get('ece'))}. A constant forecaster scores this well: "
                         "a calibration claim needs SafeConf clearly below it, and an AUROC above 0.5.")
        auroc_ci = _interval(ours, "overall", "auroc")
        lines.append("Does SafeConf's confidence tell right answers from wrong ones? " + (
            "n/a (AUROC undefined here)" if not auroc_ci else
            "yes: its AUROC interval lies above 0.5" if auroc_ci[0] > 0.5 else
            "no: its AUROC interval lies below 0.5 (it is more confident when wrong)" if auroc_ci[1] < 0.5 else
            "not at this size: its AUROC interval includes 0.5"))
        lines.append("Intervals of two methods that overlap do not show a difference; experiments/write_results.py "
                     "tests differences paired over the same questions.")
    for line in lines:
        doc.paragraph(line)
    rows = [[_method_label(m, e), e["role"], str((e.get("overall") or {}).get("n", MISSING))]
            + [cell((e.get("overall") or {}).get(k)) for k in CORE] for m, e in methods.items()]
    doc.table(["method", "model", "n"] + list(CORE.values()), rows)


def _compared(metric: str, ours: dict, theirs: dict, whose: str) -> str:
    """Whether two unpaired 95% intervals separate: the conservative reading of a difference."""
    a, b = _interval(ours, "overall", metric), _interval(theirs, "overall", metric)
    if not a or not b:
        return ""
    if a[0] > b[1]:
        return f"SafeConf's {metric} interval lies above {whose}."
    if a[1] < b[0]:
        return f"SafeConf's {metric} interval lies below {whose}."
    return f"The {metric} intervals overlap: no difference shown at this size."


def _metric_keys(summary: dict) -> list[str]:
    return list(METRIC_NAMES) + [coverage_key(float(c)) for c in summary["coverage_levels"]]


def _metric_title(key: str) -> str:
    return METRIC_NAMES.get(key) or key.replace("accuracy_at_", "acc@") + "%"


def _truncation_line(found: dict) -> str:
    """'Prompts cut to fit the model's context: base model 0 of 52 questions, ...'."""
    if not found:
        return "Prompts cut to fit the model's context: not counted."
    parts = []
    for role, entry in found.items():
        parts.append(f"{role} model {entry['truncated']} of {entry['questions']} questions")
    return ("Prompts cut to fit the model's context: " + ", ".join(parts)
            + "; per method in the table below.")


def _method_label(method: str, entry: dict) -> str:
    """The method's name, marked where its confidence says nothing (constant, or always the fallback)."""
    return f"{method} — {entry['degenerate']}" if entry.get("degenerate") else method


def _methods_table(doc: Document, summary: dict, split: str = "overall"):
    keys = _metric_keys(summary)
    if split == "overall":
        doc.heading("Confidence methods on the safety questions")
        doc.paragraph(f"Point estimate [bootstrap 95% interval, {summary['bootstrap_samples']} resamples]. "
                      f"{LOWER_IS_BETTER} acc@N%: accuracy on the N% most confident answers. F1 and AUPRC: of the "
                      "unsafe class, over the n(judge) judgements that know their unsafe option. Unanswered: "
                      "unreadable replies (counted wrong). Fallback: see the notes. Cut: questions whose prompt was "
                      "cut to fit the context. A degenerate method (one confidence for every question, or the "
                      "fallback every time) cannot rank its answers. Under each method, its base-rate reference: "
                      "the same answers with one constant confidence, the method's accuracy on the calibration "
                      "split; a calibration claim means little unless the method beats it on AUROC and resolution. "
                      "Same verdict on all variants: the share of questions whose answer did not flip on any rule "
                      "variant (options shuffled, polarity flipped, labels restyled, framing varied; eval.verdict_methods).")
    else:
        doc.heading("On the test split alone", 3)
        doc.paragraph("The questions that chose neither the selective threshold nor token_prob_temperature's "
                      "temperature (both use the calibration split): the fair comparison with the fitted method.")
    rows = []
    for method, entry in summary["methods"].items():
        scores = entry.get(split) or {}
        cut = entry.get("truncated")
        rows.append([_method_label(method, entry), entry["role"], str(scores.get("n", MISSING))]
                    + [cell(scores.get(k)) for k in keys] + [str(scores.get("guard_n", MISSING))]
                    + [cell(scores.get(k)) for k in GUARD_NAMES]
                    + ([percent(entry["unanswered"]), percent(entry["fallback"]), MISSING if cut is None else str(cut),
                        _verdicts(entry.get("verdict_consistency"))] if split == "overall" else []))
        reference = entry.get("base_rate")
        if reference and reference.get(split):
            scores = reference[split]
            rows.append([f"↳ base-rate reference ({reference['confidence']:.3f})", entry["role"],
                         str(scores.get("n", MISSING))] + [cell(scores.get(k)) for k in keys]
                        + ["", *[""] * len(GUARD_NAMES)] + (["", "", "", ""] if split == "overall" else []))
    doc.table(["method", "model", "n"] + [_metric_title(k) for k in keys] + ["n(judge)"] + list(GUARD_NAMES.values())
              + (["unanswered", "fallback", "cut", "same verdict on all variants"] if split == "overall" else []), rows)


def _verdicts(found: dict | None) -> str:
    return MISSING if not found else f"{percent(found['share'])} of {found['n']}"


def _estimators(doc: Document, summary: dict):
    found = summary.get("estimators")
    if found:
        doc.paragraph("Estimators: " + "; ".join(f"{METRIC_NAMES.get(k) or GUARD_NAMES.get(k, k)}: {v}"
                                                for k, v in found.items()) + ".")


def _posthoc(doc: Document, summary: dict):
    """What the post-hoc calibrations fitted (the temperature; the batch priors)."""
    lines = []
    for method, entry in summary["methods"].items():
        found = entry.get("calibration")
        if not found:
            continue
        if "temperature" in found:
            before, after = found.get("nll_before"), found.get("nll_after")
            lines.append(f"{method}: T = {found['temperature']:.3f}, fitted by NLL on {found['fitted_on']} "
                         f"calibration questions (NLL {number(before)} -> {number(after)})")
        if "priors" in found:
            lines.append(f"{method}: mean option probabilities divided out, per group: " + "; ".join(
                f"{group} ({v['questions']} questions) [{', '.join(f'{p:.3f}' for p in v['prior'])}]"
                for group, v in found["priors"].items()))
    if lines:
        doc.paragraph("Post-hoc calibration of token_prob (Liu et al., ICLR 2025): " + " ".join(
            f"- {line}." for line in lines))


def _breakdowns(doc: Document, summary: dict):
    for key, title in (("source", "data set"), ("lang", "language"), ("task", "task"), ("category", "category")):
        if not any(f"by_{key}" in entry for entry in summary["methods"].values()):
            continue  # metrics.json written before this breakdown existed
        doc.heading(f"By {title}", 3)
        rows = []
        metrics = ["accuracy", "ece", "l2_ece", "brier", "auroc", "aurc"]
        for method, entry in summary["methods"].items():
            for group, scores in entry[f"by_{key}"].items():
                rows.append([_method_label(method, entry), group, str(scores["n"])]
                            + [cell(scores.get(k)) for k in metrics] + [str(scores.get("guard_n", MISSING))]
                            + [cell(scores.get(k)) for k in GUARD_NAMES])
        doc.table(["method", title, "n"] + [METRIC_NAMES[k] for k in metrics] + ["n(judge)"]
                  + list(GUARD_NAMES.values()), rows)


def _selective(doc: Document, summary: dict):
    doc.heading("Selective judgement with a guarantee")
    if not summary["methods"]:
        doc.paragraph("No method was scored.")
        return
    first = next(iter(summary["methods"].values()))["selective"]
    doc.paragraph(
        f"A judgement is accepted when its confidence reaches the threshold, chosen on the calibration split "
        f"({first['calibration_questions']} questions) so that the error rate of accepted judgements is at most "
        f"alpha = {first['alpha']} with probability at least 1 - delta = {1 - first['delta']:.2f} (Clopper-Pearson bound, "
        f"fixed-sequence testing from high to low thresholds); any threshold needs at least "
        f"{min_accepted(first['alpha'], first['delta'])} calibration questions. Test split: "
        f"{first['test_questions']} questions. No threshold: no confidence level is safe enough on this data; every "
        "judgement is deferred (the endpoint too). The endpoint also defers an unreadable answer, which the "
        "evaluation counts as wrong."
    )
    rows = []
    for method, entry in summary["methods"].items():
        s = entry["selective"]
        rows.append([_method_label(method, entry), number(s["threshold"], 2),
                     f"{s['calibration_accepted']} / {s['calibration_errors']}", number(s["calibration_upper_bound"]),
                     percent(s["test_coverage"]), percent(s["test_error"])])
    doc.table(["method", "threshold", "calibration accepted / wrong", "error bound", "test coverage", "test error"], rows)


def _over_refusal(doc: Document, summary: dict):
    doc.heading("Over-refusal")
    found = summary["over_refusal"]
    if "skipped" in found:
        doc.paragraph(f"Skipped: {found['skipped']}")
        return
    doc.paragraph(f"Safe look-alike prompts from {found['data']} judged unsafe (lower is better), before and after "
                  "fine-tuning.")
    rows = [[role, method, str(v["prompts"]), percent(v["judged_unsafe"]), percent(v["unreadable"])]
            for role, methods in found["results"].items() for method, v in methods.items()]
    doc.table(["model", "method", "prompts", "judged unsafe", "unreadable"], rows)


def _general(doc: Document, summary: dict):
    doc.heading("General ability")
    found = summary["general_ability"]
    if "skipped" in found:
        doc.paragraph(f"Skipped: {found['skipped']}")
        return
    doc.paragraph(f"Accuracy on {found['data']} before and after fine-tuning (verbalized: the greedy reply's answer; "
                  "token_prob: the likeliest option label).")
    langs = sorted({k for methods in found["results"].values() for v in methods.values() for k in v
                    if k not in ("overall", "unanswered")})
    rows = [[role, method, str(v["overall"]["n"]), cell(v["overall"])] + [cell(v.get(lang)) for lang in langs]
            + [percent(v["unanswered"])]
            for role, methods in found["results"].items() for method, v in methods.items()]
    doc.table(["model", "method", "n", "accuracy"] + langs + ["unanswered"], rows)
