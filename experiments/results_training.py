"""The sections of RESULTS.md on how the models were trained: guard-tuning, the learning curve, the ablations."""

from __future__ import annotations

import json

from safeconf.evaluation.report import METRIC_NAMES, cell, percent
from safeconf.evaluation.report import number as num

from results_facts import MAIN, NA, points, run_difference, signed, value_of, verdicts
from results_figures import learning_curve_figure



class TrainingSections:
    """Report sections (a mixin of write_results.Report: self.run, self.results, self.doc, self.rows(), ...)."""

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
                "model's held-out accuracy interval lies above chance; the recipe's selection.calibration.sets, "
                "experiments/recipes/public_safety.yaml). The others were not learned by this 135M model and are left out of it. "
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
                      "ablation minus SafeConf, with a paired bootstrap 95% interval over the held-out questions; "
                      "AUROC of confidence against correctness (does the confidence tell right answers from wrong).")
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
                    for metric in ("accuracy", "ece", "auroc"):
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
