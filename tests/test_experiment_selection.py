"""The experiment's questions (experiments/shared_data_run.py) on the real ../shared/data: at least 1,000 train and
500 held-out questions, balanced over sets and gold answers, zh and en, both tasks, seeded, train and held-out
disjoint; the learning curve's subsets nested and balanced like the whole."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter

import pytest

from conftest import REPO, shared_data


def load_script(name: str = "shared_data_run"):
    """A script of experiments/ (the folder goes on sys.path: the scripts import each other)."""
    if str(REPO / "experiments") not in sys.path:
        sys.path.insert(0, str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    """The experiment's question selection (experiments/selection.py)."""
    return load_script("selection")


@pytest.fixture(scope="module")
def chosen(script):
    for folder in ("diasafety", "cold", "safetybench", "xstest", "general"):
        shared_data(folder)
    return script.select(shared_data(), seed=0)


def test_sizes_languages_and_tasks(chosen):
    train, heldout = chosen["train"], chosen["heldout"]
    assert len(train) >= 1000 and len(heldout) >= 500
    for rows in (train, heldout):
        assert {r["lang"] for r in rows} == {"en", "zh"} and {r["task"] for r in rows} == {"judge", "mcq"}
    assert {r["source"] for r in train} == {"diasafety", "cold", "safetybench", "xstest"}
    assert {r["source"] for r in heldout} == {"diasafety", "cold", "safetybench", "safetybench-dev", "xstest"}
    # the held-out SafetyBench: every dev question (35 en + 35 zh) and a part of the zh subset
    assert Counter(r["lang"] for r in heldout if r["source"] == "safetybench-dev") == {"en": 35, "zh": 35}
    assert len(chosen["general"]) == 100 and {r["source"] for r in chosen["general"]} == {"mmlu", "cmmlu"}


def test_each_set_is_balanced_over_its_gold_answers(chosen, script):
    for side in ("train", "heldout"):
        groups = Counter((r["source"], *script.balance_key(r)) for r in chosen[side]
                         if r["source"] != "safetybench-dev")  # all 70 dev questions, as they are
        for source in {s for s, *_ in groups}:
            counts = {key: n for key, n in groups.items() if key[0] == source}
            assert len(set(counts.values())) == 1, (side, counts)
    judged = Counter(r["answer"] == r["unsafe_option"] for r in chosen["train"] if r["task"] == "judge")
    assert judged[True] == judged[False]  # as many unsafe as safe judgements


def test_train_and_evaluated_questions_are_disjoint(chosen, script):
    train_ids = {r["id"] for r in chosen["train"]}
    train_texts = {script.text_of(r) for r in chosen["train"]}
    for side in ("heldout", "over_refusal"):
        assert not train_ids & {r["id"] for r in chosen[side]}
        assert not train_texts & {script.text_of(r) for r in chosen[side]}
    assert len(train_ids) == len(chosen["train"])
    assert len({r["id"] for r in chosen["heldout"]}) == len(chosen["heldout"])
    assert chosen["over_refusal"] and all(r["answer"] == 0 and r["source"] == "xstest" for r in chosen["over_refusal"])
    with pytest.raises(AssertionError, match="overlap"):
        script.check_disjoint(chosen["train"], chosen["heldout"] + chosen["train"][:1])


def test_the_guard_pool_is_large_disjoint_and_leaves_the_other_draws_as_they_were(chosen, script):
    guard = chosen["guard"]
    assert len(guard) >= 4000 and {r["source"] for r in guard} == {"diasafety", "cold", "safetybench"}
    texts = {script.text_of(r) for r in guard}
    for side in ("train", "heldout"):
        assert not {r["id"] for r in guard} & {r["id"] for r in chosen[side]}
        assert not texts & {script.text_of(r) for r in chosen[side]}
    judged = Counter(r["answer"] == r["unsafe_option"] for r in guard if r["source"] in ("diasafety", "cold"))
    assert judged[True] == judged[False]  # balanced safe / unsafe
    # drawn last: without the pool the experiment's other questions are the same ones
    without = script.select(shared_data(), seed=0, guard_scale=0)
    assert without["guard"] == []
    for side in ("train", "heldout", "general", "over_refusal"):
        assert [r["id"] for r in without[side]] == [r["id"] for r in chosen[side]], side


def test_the_calibration_experiment_draws_its_own_sets_questions_disjoint_from_the_curve_and_the_pool(chosen, script):
    train, heldout = chosen["calibration_train"], chosen["calibration_heldout"]
    assert {r["source"] for r in train + heldout} == set(script.load_recipe().calibration_sets) == {"diasafety"}
    assert len(train) == 640 and len(heldout) == 600
    # the main train draw's DiaSafety questions are kept, and more are added
    assert {r["id"] for r in chosen["train"] if r["source"] == "diasafety"} < {r["id"] for r in train}
    # held-out: none of the curve's held-out questions (which chose the set), none trained on by the guard or SafeConf
    evaluated = {script.text_of(r) for r in heldout}
    for side in ("heldout", "guard", "train"):
        assert not evaluated & {script.text_of(r) for r in chosen[side]}, side
    assert not {script.text_of(r) for r in train} & {script.text_of(r) for r in chosen["guard"]}
    for rows in (train, heldout):
        assert Counter(script.balance_key(r) for r in rows) == {("judge", "safe"): len(rows) // 2,
                                                                 ("judge", "unsafe"): len(rows) // 2}


def test_selection_is_seeded(chosen, script):
    ids = {side: [r["id"] for r in chosen[side]] for side in ("train", "heldout")}
    again = script.select(shared_data(), seed=0)
    assert {side: [r["id"] for r in again[side]] for side in ids} == ids
    other = script.select(shared_data(), seed=1)
    assert set(r["id"] for r in other["train"]) != set(ids["train"])


def test_learning_curve_subsets_are_nested_and_balanced(chosen, script):
    order = script.nested_order(chosen["train"], seed=0)
    assert sorted(order) == sorted(r["id"] for r in chosen["train"])
    assert order == script.nested_order(chosen["train"], 0)
    quarter, half = set(script.subset(order, 0.25)), set(script.subset(order, 0.5))
    assert quarter < half < set(order) and len(half) == len(order) // 2
    source = {r["id"]: r["source"] for r in chosen["train"]}
    whole = Counter(source.values())
    for part in (quarter, half):
        shares = Counter(source[i] for i in part)
        for name, n in whole.items():
            assert shares[name] / len(part) == pytest.approx(n / len(order), abs=0.02)


def test_token_prob_check_draws_disjoint_dev_and_heldout_questions():
    # experiments/token_prob_check.py (issue 12 part 6) reads the sets through the experiment's own reader
    sys.path.insert(0, str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location("token_prob_check", REPO / "experiments" / "token_prob_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    for folder in ("diasafety", "cold", "safetybench", "xstest"):
        shared_data(folder)
    dev, heldout = check.questions("dev", 4, 0), check.questions("heldout", 4, 0)
    for rows in (dev, heldout):
        assert {r["source"].split("-")[0] for r in rows} == {"diasafety", "cold", "safetybench", "xstest"}
    assert not {r["question"] for r in dev} & {r["question"] for r in heldout}


def test_a_recipe_names_what_is_wrong_with_it(script, tmp_path):
    """A recipe whose draw lacks a key, or whose ablation has an unknown one, is refused naming the place."""
    import yaml

    doc = yaml.safe_load(script.RECIPE.read_text())
    assert script.load_recipe().settings[0].startswith("mutation.operators=")
    broken = dict(doc, selection={**doc["selection"], "heldout": [{"name": "x", "spec": "jsonl:{d}/x.jsonl"}]})
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(ValueError, match=r"selection.heldout\[0\]: .*count"):
        script.load_recipe(path)
    odd = dict(doc, ablations={"plain": {"sft": {}, "methods": ["safeconf"], "why": "?"}})
    path.write_text(yaml.safe_dump(odd))
    with pytest.raises(ValueError, match="ablations.plain must have exactly sft, methods and about"):
        script.load_recipe(path)
