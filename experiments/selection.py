"""The experiment's questions: which are drawn from which public data file, balanced and seeded, and kept apart
(train, held-out, the guard pool, the calibration experiment's sets). Used by shared_data_run.py and the tests."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from safeconf.guard import balance_of, text_key
from safeconf.data.ingest import ingest


log = logging.getLogger("experiment")

SHARED = Path(os.environ.get("SAFECONF_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@dataclasses.dataclass(frozen=True)
class Draw:
    """`count` questions drawn at random from a data set, balanced over its balance_key groups."""

    name: str  # the data set as the selection reports it
    spec: str  # a questions SPEC, {d} standing for the shared data folder
    count: int
    balance: bool = True  # False: a plain random draw (sets too small to balance, or without safety labels)

    def location(self, shared: Path) -> str:
        return self.spec.format(d=shared)


RECIPE = Path(__file__).resolve().parent / "recipes" / "public_safety.yaml"  # the RESULTS.md experiment


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An experiment's recipe (experiments/recipes/*.yaml): its draws, settings and ablations."""

    seed: int
    train: list[Draw]
    heldout: list[Draw]
    general: list[Draw]
    over_refusal: Draw
    guard: list[Draw]
    calibration_sets: tuple[str, ...]
    calibration_train_more: list[Draw]
    calibration_heldout: list[Draw]
    settings: list[str]  # config overrides
    ablations: dict  # name -> {sft, methods, about}


def load_recipe(path: str | Path = RECIPE) -> Recipe:
    """The recipe of a YAML file; a draw or ablation that lacks a key, or has an unknown one, names it."""
    path = Path(path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))

    def draws(where: str, entries) -> list[Draw]:
        found = []
        for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
            try:
                found.append(Draw(**entry))
            except TypeError as error:
                raise ValueError(f"{path}: {where}[{i}]: {error} (a draw has name, spec, count and balance)") from None
        return found

    selection, calibration = doc["selection"], doc["selection"]["calibration"]
    for name, ablation in doc.get("ablations", {}).items():
        if set(ablation) != {"sft", "methods", "about"}:
            raise ValueError(f"{path}: ablations.{name} must have exactly sft, methods and about, got {sorted(ablation)}")
    return Recipe(seed=doc.get("seed", 0), train=draws("selection.train", selection["train"]),
                  heldout=draws("selection.heldout", selection["heldout"]),
                  general=draws("selection.general", selection["general"]),
                  over_refusal=draws("selection.over_refusal", selection["over_refusal"])[0],
                  guard=draws("selection.guard", selection.get("guard", [])),
                  calibration_sets=tuple(calibration["sets"]),
                  calibration_train_more=draws("selection.calibration.train_more", calibration["train_more"]),
                  calibration_heldout=draws("selection.calibration.heldout", calibration["heldout"]),
                  settings=[str(s) for s in doc.get("settings", [])], ablations=doc.get("ablations", {}))


# --- selection ---


def balance_key(row: dict) -> tuple:
    """What a draw balances over: the task, and safe vs unsafe for a judgement, the right option's position for a
    multiple-choice question (safeconf.guard.balance_of, which the guard stage's counts use too)."""
    return (row["task"], balance_of(row))


def read_pool(spec: str) -> list[dict]:
    """The valid questions of a SPEC, in file order (safeconf.data.ingest: the same validation as every stage)."""
    questions, rejects, read = ingest(spec)
    if rejects.num_rows:
        log.info("%s: %d of %d rows rejected at the door (as the pipeline would)", spec, rejects.num_rows, read)
    return questions.to_pylist()


def balanced(rows: list[dict], count: int, rng: random.Random, name: str) -> list[dict]:
    """`count` rows drawn at random, the same number from every balance_key group (at least one from each:
    a scaled-down smoke selection may get a few more than asked)."""
    groups = defaultdict(list)
    for row in rows:
        groups[balance_key(row)].append(row)
    if not groups:
        raise ValueError(f"{name}: no questions left to draw from")
    per = max(1, count // len(groups))
    short = {str(k): len(g) for k, g in groups.items() if len(g) < per}
    if short:
        raise ValueError(f"{name}: {per} questions wanted from every balance_key group, but groups {short} "
                         "have fewer")
    picked = []
    for key in sorted(groups, key=str):
        picked += rng.sample(groups[key], per)
    rng.shuffle(picked)
    return picked


def scaled(draws: list[Draw], scale: float) -> list[Draw]:
    return [dataclasses.replace(d, count=max(1, round(d.count * scale))) for d in draws]


def select(shared: Path, seed: int | None = None, scale: float = 1.0, guard_scale: float = 1.0,
           recipe: Recipe | None = None) -> dict[str, list[dict]]:
    """{"train", "heldout", "general", "over_refusal", "guard": questions} of the recipe's draws (default: the
    RESULTS.md experiment's): seeded (default: the recipe's seed), balanced; train, held-out and the guard pool
    disjoint (guard_scale 0: no guard pool)."""
    recipe = recipe or load_recipe()
    seed = recipe.seed if seed is None else seed
    rng = random.Random(seed)
    pools, used = {}, defaultdict(set)  # spec -> rows; spec -> ids already drawn
    trained_texts: set = set()
    excluded = Counter()  # held-out candidates left out because a training question has their text

    def draw(d: Draw, keep=lambda row: True) -> list[dict]:
        spec = d.location(shared)
        if spec not in pools:
            pools[spec] = read_pool(spec)
        left = [r for r in pools[spec] if r["id"] not in used[spec] and keep(r)]
        kept = [r for r in left if text_of(r) not in trained_texts]
        excluded[d.name] += len(left) - len(kept)
        if d.balance:
            rows = balanced(kept, d.count, rng, d.name)
        else:
            rows = rng.sample(kept, min(d.count, len(kept)))
        used[spec].update(r["id"] for r in rows)
        return rows

    train = [r for d in scaled(recipe.train, scale) for r in draw(d)]
    trained_texts.update(text_of(r) for r in train)
    excluded.clear()  # count only what the held-out draws leave out
    heldout = [r for d in scaled(recipe.heldout, scale) for r in draw(d)]
    heldout_excluded = dict(excluded)
    general = [r for d in scaled(recipe.general, scale) for r in draw(d)]
    # drawn after the held-out XSTest part, from the safe prompts training left: some are held-out questions too
    used[recipe.over_refusal.location(shared)] = {r["id"] for r in train}
    over_refusal = draw(scaled([recipe.over_refusal], scale)[0], keep=lambda row: row["answer"] == 0)
    # last, so the draws above are those of the runs before guard-tuning existed (the same seed, the same questions)
    trained_texts.update(text_of(r) for r in heldout)  # the guard pool shares no text with train or held-out
    guard = [r for d in scaled(recipe.guard, guard_scale) for r in draw(d)] if guard_scale else []
    check_disjoint(train, heldout)
    check_disjoint(train, over_refusal)
    check_disjoint(guard, train + heldout)
    chosen = {"train": train, "heldout": heldout, "general": general, "over_refusal": over_refusal, "guard": guard,
              "excluded_as_train_duplicates": heldout_excluded}
    if guard:  # the calibration experiment's questions (recipe.calibration_sets), drawn last
        trained_texts.update(text_of(r) for r in guard)
        more = [r for d in scaled(recipe.calibration_train_more, scale) for r in draw(d)]
        chosen["calibration_train"] = [r for r in train if r["source"] in recipe.calibration_sets] + more
        trained_texts.update(text_of(r) for r in more)
        chosen["calibration_heldout"] = [r for d in scaled(recipe.calibration_heldout, scale) for r in draw(d)]
        check_disjoint(chosen["calibration_train"] + guard, chosen["calibration_heldout"] + heldout)
    return chosen


text_of = text_key  # a question's identity by its text and options, as the guard stage keeps its pool apart


def check_disjoint(train: list[dict], evaluated: list[dict]) -> None:
    """No evaluated question is a training question, by id or by its text and options; no id repeats on a side."""
    for name, rows in (("train", train), ("evaluated", evaluated)):
        repeated = [i for i, c in Counter(r["id"] for r in rows).items() if c > 1]
        if repeated:
            raise AssertionError(f"{name} questions repeat ids {repeated[:3]}")
    ids = {r["id"] for r in train} & {r["id"] for r in evaluated}
    texts = {text_of(r) for r in train} & {text_of(r) for r in evaluated}
    if ids or texts:
        raise AssertionError(f"train and held-out questions overlap: {len(ids)} ids (e.g. {sorted(ids)[:3]}), "
                             f"{len(texts)} question texts")


def describe(rows: list[dict]) -> dict:
    """Counts a reader checks the balance by: per data set (by balance_key), language and task."""
    by_source = defaultdict(Counter)
    for r in rows:
        by_source[r["source"]]["/".join(balance_key(r))] += 1
    return {"questions": len(rows),
            "by_source": {s: {"questions": sum(c.values()), **dict(sorted(c.items()))}
                          for s, c in sorted(by_source.items())},
            "by_lang": dict(sorted(Counter(r["lang"] for r in rows).items())),
            "by_task": dict(sorted(Counter(r["task"] for r in rows).items()))}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Write the rows (unchanged bytes when unchanged: the stages' fingerprints hash the file) and return a SPEC."""
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")
    return f"jsonl:{path}"


def nested_order(rows: list[dict], seed: int) -> list[str]:
    """Train question ids in an order whose every prefix is balanced like the whole (stratified by data set, task
    and answer): the learning curve's smaller sets are prefixes, so each contains the smaller ones."""
    rng = random.Random(f"curve:{seed}")
    strata = defaultdict(list)
    for r in rows:
        strata[(r["source"], *balance_key(r))].append(r["id"])
    ranked = []
    for key in sorted(strata, key=str):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        ranked += [((i + rng.random()) / len(ids), qid) for i, qid in enumerate(ids)]
    return [qid for _, qid in sorted(ranked)]


def subset(order: list[str], fraction: float) -> list[str]:
    return order[: max(1, round(len(order) * fraction))]
