"""experiments/write_results.py: the headline names the right best baseline, the difference and the verdicts, on
synthetic results.json files (a win and losses) and on a smoke-scale run of the experiment that it makes."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_module():
    if str(REPO / "experiments") not in sys.path:  # write_results imports the scripts beside it
        sys.path.insert(0, str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location("write_results", REPO / "experiments" / "write_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wr = load_module()
import results_facts as rf  # noqa: E402  (on sys.path once load_module ran)


def scores(acc, ece, n=200, test_ece=None):
    return {"n": n, "accuracy": {"value": acc, "ci": [acc - 0.05, acc + 0.05]},
            "ece": {"value": ece, "ci": [max(0.0, ece - 0.03), ece + 0.03]},
            "l2_ece": {"value": ece + 0.02, "ci": None}, "brier": {"value": 0.2, "ci": [0.18, 0.22]},
            "auroc": {"value": None, "ci": None}, "aurc": {"value": 0.3, "ci": [0.25, 0.35]}, "guard_n": 150,
            "unsafe_f1": {"value": 0.6, "ci": [0.5, 0.7]}, "unsafe_auprc": {"value": 0.7, "ci": [0.6, 0.8]}}


def method(acc, ece, test_ece=None, role="base", **extra):
    return {"role": role, "questions": 200, "fallback": 0.0, "degenerate": None, "unanswered": 0.0,
            "overall": scores(acc, ece), "test": scores(acc, ece if test_ece is None else test_ece, n=100),
            "by_source": {"cold": scores(acc, ece, n=100), "xstest": scores(acc - 0.1, ece, n=100)},
            "selective": {"alpha": 0.1, "delta": 0.1, "calibration_questions": 100, "calibration_accepted": 40,
                          "calibration_errors": 1, "calibration_upper_bound": 0.09, "threshold": 0.8,
                          "test_questions": 100, "test_accepted": 38, "test_coverage": 0.38, "test_error": 0.05},
            **extra}


def results(safeconf=(0.72, 0.08, None), general=(0.50, 0.49), temperature_test_ece=0.11):
    baselines = {
        "verbalized": method(0.40, 0.60, fallback_meaning="reply stated no confidence",
                             degenerate="degenerate (constant confidence 1.000), 100% fallback"),
        "token_prob": method(0.60, 0.20),
        "self_consistency": method(0.65, 0.15),
        "token_prob_temperature": method(0.60, 0.12, test_ece=temperature_test_ece,
                                         calibration={"temperature": 1.7, "fitted_on": 100}),
    }
    baselines["verbalized"]["fallback"] = 1.0
    acc, ece, test_ece = safeconf
    models = {
        "safeconf_50": {"train_fraction": 0.5, "train_questions": 500,
                        "methods": {"safeconf": method(acc - 0.02, ece + 0.01, role="adapter")}},
        "safeconf": {"train_fraction": 1.0, "train_questions": 1000,
                     "methods": {"safeconf": method(acc, ece, test_ece, role="adapter"),
                                 "adapter_token_prob": method(0.6, 0.2, role="adapter")}},
        "no_confidence": {"train_fraction": 0.5, "train_questions": 500, "compare_with": "safeconf_50",
                          "sft_settings": {"confidence_format": "none"}, "description": "(a) gold answers only",
                          "methods": {"adapter_token_prob": method(0.61, 0.18, role="adapter")}},
    }
    return {
        "command": ["experiments/shared_data_run.py", "--out", "runs/experiment"], "seeds": {"selection": 0},
        "sizes": {"train": 1000, "heldout": 200}, "baselines": baselines, "models": models,
        "general_ability": {"data": "mmlu+cmmlu", "results": {
            "base": {"token_prob": {"overall": {"n": 100, "value": general[0], "ci": None}, "unanswered": 0.0}},
            "adapter": {"token_prob": {"overall": {"n": 100, "value": general[1], "ci": None}, "unanswered": 0.0}}}},
        "over_refusal": {"skipped": "eval.over_refusal_data is empty"},
        "estimators": {"ece": "L1 over 10 equal-width bins"}, "warnings": [], "notes": [],
        "steps": {"select": 1.0}, "wall_seconds": 4000.0,
    }


def write_run(tmp_path, data) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(data))
    return run


def test_safeconf_wins_every_target():
    facts = rf.headline(results())
    assert facts["best"] == "self_consistency"  # highest accuracy; the temperature baseline has the lowest ECE
    assert facts["best_calibrated"] == "token_prob_temperature"
    assert facts["accuracy"]["difference"] == pytest.approx(0.07)
    assert facts["ece"]["difference"] == pytest.approx(-0.07)
    assert {k: t["verdict"] for k, t in facts["targets"].items()} == {"accuracy": "met", "ece": "met",
                                                                       "general": "met"}
    assert "7.0 points above self_consistency" in rf.verdict_line(facts)


def test_safeconf_loses_each_target():
    # +3 points (target +5.9), ECE above the temperature baseline's, general ability 3 points down
    facts = rf.headline(results(safeconf=(0.68, 0.13, None), general=(0.50, 0.47)))
    assert facts["best"] == "self_consistency"
    assert facts["accuracy"]["difference"] == pytest.approx(0.03)
    targets = facts["targets"]
    assert {k: t["verdict"] for k, t in targets.items()} == {"accuracy": "not met", "ece": "not met",
                                                             "general": "not met"}
    assert "token_prob_temperature 0.120" in targets["ece"]["why"]
    assert "self_consistency" not in targets["ece"]["why"]  # 0.15 is above SafeConf's 0.13


def test_temperature_compared_on_the_test_split():
    # lower overall ECE than every baseline, but the temperature baseline is better where its fit saw nothing
    facts = rf.headline(results(safeconf=(0.72, 0.10, 0.12), temperature_test_ece=0.11))
    assert facts["targets"]["ece"]["verdict"] == "not met"
    assert "on the test split" in facts["targets"]["ece"]["why"]
    assert rf.headline(results(safeconf=(0.72, 0.10, 0.10)))["targets"]["ece"]["verdict"] == "met"


def test_an_ece_win_inside_the_interval_is_said_to_be_unsettled():
    unsettled = {"ece": {"value": -0.02, "ci": [-0.05, 0.01]}}
    facts = rf.headline(results(), calibrated_difference=unsettled)
    target = facts["targets"]["ece"]
    assert target["verdict"] == "met" and target["unsettled"]
    assert "not settled at this size" in target["why"] and "token_prob_temperature" in target["why"]
    assert "ECE below every baseline: MET (on the point estimates; not settled" in rf.verdict_line(facts)
    settled = rf.headline(results(), calibrated_difference={"ece": {"value": -0.02, "ci": [-0.04, -0.01]}})
    assert not settled["targets"]["ece"]["unsettled"] and "settled: the interval lies below 0" in \
        settled["targets"]["ece"]["why"]


def test_tie_goes_to_the_first_and_is_named():
    data = results()
    data["baselines"]["token_prob"]["overall"]["accuracy"]["value"] = 0.65
    facts = rf.headline(data)
    assert facts["best"] == "token_prob" and facts["tied"] == ["self_consistency"]


def test_missing_general_ability_is_na_with_its_reason():
    data = results()
    data["general_ability"] = {"skipped": "eval.general_data is empty"}
    target = rf.headline(data)["targets"]["general"]
    assert target["verdict"] == "n/a" and target["why"] == "eval.general_data is empty"


def test_paired_difference_uses_the_same_questions():
    a = [{"id": str(i), "source": "s", "answer": 0, "choice": 0, "confidence": 0.9} for i in range(10)]
    b = [{"id": str(i), "source": "s", "answer": 0, "choice": int(i < 4), "confidence": 0.9} for i in range(10)]
    b.append({"id": "only-b", "source": "s", "answer": 0, "choice": 1, "confidence": 0.9})
    found = rf.paired_difference(a, b, bins=10, samples=200, seed=0)
    assert found["n"] == 10
    assert found["accuracy"]["value"] == pytest.approx(0.4)
    low, high = found["accuracy"]["ci"]
    assert 0 < low <= 0.4 <= high
    assert rf.paired_difference(a, None, 10, 200, 0) is None


def test_report_renders_headline_first(tmp_path):
    run = write_run(tmp_path, results(safeconf=(0.68, 0.13, None), general=(0.50, 0.47)))
    out = tmp_path / "site"
    written = wr.write(run, out)
    text = (out / "RESULTS.md").read_text()
    headline = text.index("## Headline")
    assert headline < text.index("## Every method") < text.index("## Learning curve") < text.index("## Ablations")
    head = text[headline:text.index("## Every method")]
    assert "3.0 points above self_consistency" in head
    assert "+3.0 points" in head and head.count("| NOT MET |") == 3
    assert "bootstrap 95% interval, n/a resamples" in head  # no metrics.json in this run: not made up
    assert "verbalized | 200" in text and "DEGENERATE (constant confidence 1.000)" in text
    assert "Over-refusal: n/a (eval.over_refusal_data is empty)" in text
    assert "no_confidence | adapter_token_prob | safeconf_50 / safeconf" in text  # its compare_with partner
    assert "Reliability plot: n/a" in head  # no predictions in this synthetic run
    assert "learning_curve.png" in text  # two training sizes: a curve
    html = (out / "RESULTS.html").read_text()
    assert html.index("Headline") < html.index("Every method") and "<table>" in html
    assert written["headline"]["best"] == "self_consistency"


def test_report_of_a_win(tmp_path):
    wr.write(write_run(tmp_path, results()), tmp_path / "site")
    text = (tmp_path / "site" / "RESULTS.md").read_text()
    head = text[text.index("## Headline"):text.index("## Every method")]
    assert head.count("| MET |") == 3 and "NOT MET" not in head
    assert "7.0 points above self_consistency in accuracy and better calibrated" in head


def test_a_guard_tuned_run_shows_the_untrained_rows_the_guard_curve_and_the_base_rate_references(tmp_path):
    data = results()
    data["model"] = {"name": "runs/experiment/main/guard/merged", "guard_tuned": True}
    data["base_model"] = {"methods": {"token_prob": method(0.48, 0.05)}}
    data["baselines"]["token_prob"]["base_rate"] = {"confidence": 0.61, "overall": scores(0.60, 0.01),
                                                    "test": scores(0.60, 0.02, n=100)}
    data["baselines"]["token_prob"]["verdict_consistency"] = {"share": 0.75, "n": 200}
    data["guard"] = {"pool": {"read": 4000, "rejected": 0, "left_out": {}, "examples": {"train": 3926, "val": 74}},
                     "train": {"steps": 978, "train_tokens": 800000, "tokens_per_s": 95.0, "precision": "fp32",
                               "seconds": 8400, "final_train_loss": 0.2},
                     "curve": [{"examples": 2000, "overall": scores(0.66, 0.1), "by_source": {"cold": scores(0.55, 0.1)},
                                "verdict_consistency": {"share": 0.8, "n": 200}},
                               {"examples": 0, "method": "token_prob", "overall": scores(0.48, 0.05),
                                "by_source": {"diasafety": scores(0.51, 0.1)}},
                               {"examples": 1000, "overall": scores(0.61, 0.1), "by_source": {}}]}
    data["calibration"] = {"sets": ["diasafety"], "train": "calibration_train", "heldout": "calibration_heldout"}
    data["sizes"] = {"heldout": 560, "calibration_train": 640, "calibration_heldout": 600}
    wr.write(write_run(tmp_path, data), tmp_path / "site")
    text = (tmp_path / "site" / "RESULTS.md").read_text()
    guard = text[text.index("## Guard-tuning"):text.index("## Every method")]
    rows = [line for line in guard.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 1000", "| 2000"]  # untrained first, then in order
    assert "0.480" in rows[0] and "0.660" in rows[2] and "80.0% of 200" in rows[2]
    assert "accuracy: cold | accuracy: diasafety" in guard  # every set of the curve, not only the experiment's
    assert "sets guard-tuning taught: diasafety" in guard and "a fresh draw of 600 held-out questions" in guard
    assert "# Results: SafeConf against its baselines on a guard-tuned model" in text
    methods = text[text.index("## Every method"):]
    assert "| untrained | token_prob |" in methods and "| guard | token_prob |" in methods
    assert "↳ base rate (0.610)" in methods and "75.0% of 200" in methods


# The experiment at smoke scale, built here so that a clean checkout tests write_results on a real results.json: a
# handful of questions from ../shared/data, no guard-tuning, two optimizer steps, the untrained model's token_prob
# rows and one ablation (no_confidence, so a model evaluated by adapter_token_prob is in it). ~4 min on 2 cores.
SMOKE_COMMAND = ["--scale", "0.02", "--guard-scale", "0", "--curve", "1.0", "--ablations", "no_confidence",
                 "--ablation-fraction", "1.0", "--base-methods", "token_prob", "train.max_steps=2",
                 "sft.val_fraction=0.3", "eval.bootstrap_samples=20", "eval.aux_limit=4"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """OUT of experiments/shared_data_run.py at smoke scale, in a process of its own with its own Ray."""
    import os
    import shutil
    import subprocess
    import tempfile

    from conftest import shared_data

    shared = shared_data()
    out = tmp_path_factory.mktemp("experiment-smoke")
    ray_dir = tempfile.mkdtemp(prefix="ws-", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    try:
        run = subprocess.run([sys.executable, "experiments/shared_data_run.py", "--out", str(out), *SMOKE_COMMAND],
                             cwd=REPO, capture_output=True, text=True, timeout=1800,
                             env={**os.environ, "RAY_TMPDIR": ray_dir, "SAFECONF_SHARED_DATA": str(shared)})
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    return out


@pytest.mark.slow
def test_smoke_run(smoke_run, tmp_path):
    """write_results on a real (smoke-scale) run: the headline's best baseline is the most accurate one, its
    difference is SafeConf's accuracy minus that baseline's with a paired interval, the figures are drawn, and the
    ablation's and the base model's rows are in the tables."""
    data = json.loads((smoke_run / "results.json").read_text())
    written = wr.write(smoke_run, tmp_path)
    facts = written["headline"]
    accuracy = {m: e["overall"]["accuracy"]["value"] for m, e in data["baselines"].items()}
    assert facts["best"] == max(accuracy, key=accuracy.get)
    ours = data["models"]["safeconf"]["methods"]["safeconf"]["overall"]["accuracy"]["value"]
    assert facts["accuracy"]["difference"] == pytest.approx(ours - accuracy[facts["best"]])
    assert facts["accuracy"]["difference_ci"] is not None
    assert (tmp_path / "docs" / "results" / "reliability.png").stat().st_size > 1000
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("# Results") and "## Headline" in text
    assert "| no_confidence | adapter_token_prob |" in text
    assert "| base | token_prob |" in text  # the untrained model's rows (no guard-tuning at this scale)


def test_issue_20_targets_need_more_than_a_constant_can_give():
    """ECE against the base-rate reference is met only when its paired interval lies below 0; AUROC against
    token_prob on the point estimate, said unsettled when the interval holds 0; over-refusal within 5 points for
    every method."""
    rng = np.random.default_rng(0)
    confidence = rng.random(400)
    right = rng.random(400) < confidence  # calibrated and sharp: beats any constant
    rows = [{"id": str(i), "source": "s", "answer": 0, "choice": 0 if r else 1, "confidence": float(c)}
            for i, (c, r) in enumerate(zip(confidence, right))]
    # the reference's constant is the calibration split's accuracy, a forecast for the test split: off by some
    # points here (in-sample, a constant equal to the accuracy has an ECE of 0, which no sharp method can beat)
    constant = [{**r, "confidence": float(right.mean()) - 0.15} for r in rows]
    found = rf.paired_difference(rows, constant, bins=10, samples=300, seed=0)
    assert found["auroc"]["value"] > 0.2  # a constant's AUROC is 0.5
    met = rf.base_rate_target(found)
    assert met["verdict"] == "met" and "below 0" in met["why"]
    flat = rf.paired_difference(constant, constant, bins=10, samples=300, seed=0)
    assert rf.base_rate_target(flat)["verdict"] == "not met"  # no better than the constant
    assert rf.auroc_target(flat)["verdict"] == "met"  # level with the reference: "at least" holds
    assert rf.base_rate_target(None)["verdict"] == "n/a"

    def refusal(before, after):
        return {"results": {"base": {"token_prob": {"prompts": 200, "judged_unsafe": before}},
                            "adapter": {"token_prob": {"prompts": 200, "judged_unsafe": after}}}}

    assert rf.over_refusal_target(refusal(0.30, 0.34))["verdict"] == "met"
    moved = rf.over_refusal_target(refusal(0.30, 0.40))
    assert moved["verdict"] == "not met" and "+10.0 points" in moved["measured"]


def test_a_second_run_is_compared_in_its_own_section_before_the_provenance(tmp_path):
    """write_results RUN --compare OTHER: a section with both runs' metrics per method and OTHER's targets; these
    synthetic runs have no predictions, so the paired differences say n/a rather than being made up."""
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = write_run(tmp_path / "first", results())
    data = results(safeconf=(0.60, 0.20, None))
    data["command"] = ["experiments/shared_data_run.py", "--out", "second", "guard.variants=3"]
    second = write_run(tmp_path / "second", data)
    written = wr.write(first, tmp_path / "site", compare=second, compare_label="a guard taught with rule variants")
    text = (tmp_path / "site" / "RESULTS.md").read_text()
    section = text[text.index("## The same experiment on another model: a guard taught with rule variants"):]
    assert text.index("## The same experiment on another model") < text.index("## How this run was made")
    assert "guard.variants=3" in section
    row = next(line for line in section.splitlines() if line.startswith("| safeconf (fine-tuned)"))
    assert row.split(" | ")[1].startswith("0.720") and row.split(" | ")[2].startswith("0.600") and "| n/a |" in row
    assert written["headline"]["compared"]["accuracy"]["verdict"] == "n/a"  # no predictions: no paired verdict
    head = text[text.index("## Headline"):text.index("## Headline") + 4000]
    assert "A second run of this experiment, a guard taught with rule variants" in head and "SafeConf accuracy 0.600" in head
