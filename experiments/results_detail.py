"""The detail sections of RESULTS.md: selective judgement, general ability and over-refusal, the labels, where
SafeConf wins, the token_prob check and how the run was made."""

from __future__ import annotations

import json
import shlex
from collections import Counter, defaultdict

import numpy as np

from safeconf.evaluation import plots
from safeconf.evaluation.report import cell, percent
from safeconf.evaluation.report import number as num
from safeconf.evaluation.selective import min_accepted, selective_judgement

from results_facts import LOOSER_ALPHAS, MAIN, NA, best_baseline, points, run_difference, signed, value_of
from results_figures import by_source_figure, scores_of, sft_figure



class DetailSections:
    """Report sections (a mixin of write_results.Report: self.run, self.results, self.doc, self.rows(), ...)."""

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
