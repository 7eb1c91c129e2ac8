"""A second run of the calibration experiment against the first, on the same held-out questions: the section of
RESULTS.md that `write_results.py RUN --compare OTHER` adds.

OTHER is the experiment run again with one thing changed (e.g. a guard model taught with rule variants,
guard.variants): the selection seed and sizes are the same, so both runs score the same held-out questions, and
each difference (OTHER minus RUN) is paired over them, with a bootstrap interval. Every number is read from the two
runs' results.json and predictions.
"""

from __future__ import annotations

import shlex
from collections import defaultdict

from safeconf.evaluation.report import cell, percent
from safeconf.evaluation.report import number as num

from results_facts import (  # experiments/ is on sys.path: scripts beside each other
    MAIN,
    NA,
    Run,
    auroc_target,
    base_rate_difference,
    base_rate_target,
    best_baseline,
    paired_difference,
    run_difference,
    signed,
)

# the rows of the comparison: a base-model method is (None, method), the SafeConf model's are (MAIN, method)
COMPARED = [(None, "token_prob"), (None, "token_prob_temperature"), (None, "token_prob_contextual"),
            (None, "token_prob_batch"), (None, "mutation_consistency"), (MAIN, MAIN), (MAIN, "adapter_token_prob")]


def entry_of(run: Run, model: str | None, method: str) -> dict | None:
    if model is None:
        return run.results["baselines"].get(method)
    return run.results["models"].get(model, {}).get("methods", {}).get(method)


def variant_accuracy(run: Run) -> dict[str, float]:
    """Share of sampled answers that are right per kind of variant, over the training questions."""
    right, total = defaultdict(int), defaultdict(int)
    for row in run.confidence_rows() or []:
        for entry in row.get("per_mutation") or []:
            right[entry["mutation"]] += entry["correct"] or 0
            total[entry["mutation"]] += entry["valid"] or 0
    return {m: right[m] / total[m] for m in total if total[m]}


def across(first: Run, second: Run, model: str | None, method: str) -> dict | None:
    """second minus first for one (model, method), paired over the held-out questions both scored."""
    samples = first.bootstrap_samples or first.eval["bootstrap_samples"]
    return paired_difference(second.predictions(model, method), first.predictions(model, method),
                             first.eval["ece_bins"], samples, first.eval["seed"])


def headline_line(second: Run, label: str, facts: dict) -> str:
    """One paragraph for the top of RESULTS.md: the second run's SafeConf and its targets, pointing to its section."""
    ours = (entry_of(second, MAIN, MAIN) or {}).get("overall", {})
    verdicts = "; ".join(f"{f['target'].split(' (')[0]}: {f['verdict']}" for f in facts.values())
    return (f"A second run of this experiment, {label} (section \"The same experiment on another model\" below): "
            f"SafeConf accuracy {cell(ours.get('accuracy'))}, ECE {cell(ours.get('ece'))}, AUROC "
            f"{cell(ours.get('auroc'))}. Its targets: {verdicts}.")


def add_section(doc, first: Run, second: Run, label: str) -> dict:
    """The comparison's section in `doc` (a safeconf.evaluation.report.Document); returns its facts."""
    doc.heading(f"The same experiment on another model: {label}")
    command = second.results.get("command")
    doc.paragraph(f"Run again into {second.root} ({shlex.join(command) if command else 'command not recorded'}), "
                  f"with the same selection, so both runs score the same held-out questions. Each row: the first "
                  f"run (the model above), the second, and second minus first paired over the questions both "
                  f"scored (95% bootstrap interval).")
    rows = []
    for model, method in COMPARED:
        a, b = entry_of(first, model, method), entry_of(second, model, method)
        if a is None and b is None:
            continue
        diff = across(first, second, model, method) or {}
        name = method if model is None else f"{method} (fine-tuned)"
        rows.append([name, cell((a or {}).get("overall", {}).get("accuracy")),
                     cell((b or {}).get("overall", {}).get("accuracy")),
                     signed((diff.get("accuracy") or {}).get("value"), (diff.get("accuracy") or {}).get("ci")),
                     num(((a or {}).get("overall", {}).get("ece") or {}).get("value")),
                     num(((b or {}).get("overall", {}).get("ece") or {}).get("value")),
                     signed((diff.get("ece") or {}).get("value"), (diff.get("ece") or {}).get("ci")),
                     num(((a or {}).get("overall", {}).get("auroc") or {}).get("value")),
                     num(((b or {}).get("overall", {}).get("auroc") or {}).get("value")),
                     signed((diff.get("auroc") or {}).get("value"), (diff.get("auroc") or {}).get("ci")),
                     str(diff.get("n", NA))])
    doc.table(["method", "accuracy 1st", "2nd", "2nd - 1st", "ECE 1st", "2nd", "2nd - 1st", "AUROC 1st", "2nd",
               "2nd - 1st", "n"], rows)
    base = (across(first, second, None, "token_prob") or {}).get("accuracy") or {}
    if base.get("ci") and base["ci"][1] < 0:
        doc.paragraph(f"The second run's model lost accuracy before SafeConf (token_prob {signed(base['value'], base['ci'])}"
                      "): its baselines are weaker, so SafeConf's accuracy against them below measures what SafeConf's "
                      "fine-tune (gold answers in its targets) recovers, not what its confidence adds.")

    before, after = variant_accuracy(first), variant_accuracy(second)
    kinds = sorted(before.keys() | after.keys(), key=lambda m: (m != "original", m))
    if kinds:
        doc.paragraph("Share of the sampled answers that are right per kind of variant, on the training questions "
                      "(what SafeConf's confidence is measured from):")
        doc.table(["variant", "1st run", "2nd run"], [[m, percent(before.get(m)), percent(after.get(m))] for m in kinds])

    # the second run's own targets: what a constant forecaster cannot pass
    facts = {"auroc": auroc_target(run_difference(second, (MAIN, MAIN), (None, "token_prob"))),
             "base_rate": base_rate_target(base_rate_difference(second))}
    best = best_baseline(second.results["baselines"], "accuracy")[0]
    versus_best = run_difference(second, (MAIN, MAIN), (None, best)) if best else None
    accuracy = (versus_best or {}).get("accuracy") or {}
    facts["accuracy"] = {"target": f"SafeConf accuracy at least the best baseline's ({best}, among this run's "
                                   f"{len(second.results['baselines'])} baselines)",
                         "measured": f"difference {signed(accuracy.get('value'), accuracy.get('ci'))}",
                         "verdict": NA if accuracy.get("value") is None else "met" if accuracy["value"] >= 0 else "not met"}
    doc.paragraph("The second run's targets:")
    doc.table(["target", "measured", "verdict", "why"],
              [[f["target"], f["measured"], f["verdict"], f.get("why", "")] for f in facts.values()])
    return facts
