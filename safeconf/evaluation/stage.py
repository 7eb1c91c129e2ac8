"""The evaluation's Ray Data stage: an engine actor that runs the planned confidence methods
(safeconf.evaluation.methods) on batches of questions and writes one prediction row per (question, method)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import pyarrow as pa

from safeconf.confidence import question_confidence
from safeconf.config import config_from_dict
from safeconf.evaluation.methods import (
    JUDGE_METHODS,
    PREDICTION_SCHEMA,
    SAMPLING_METHODS,
    Judgement,
    JudgeSettings,
    judge_each,
    unsafe_probability,
)
from safeconf.mutations import mutate_rules, original_variant
from safeconf.pipeline import EngineStage

log = logging.getLogger(__name__)


class EvalStage(EngineStage):
    """A Ray Data actor holding one engine (base model, or base + adapter): runs the planned methods on a
    batch of questions and returns one prediction row per (question, method).

    `plan` maps an eval set to {output method name: method}, e.g. {"safety": {"safeconf": "verbalized"}}.
    It reuses EngineStage's LLM mutations and sampling, so mutation consistency is measured exactly as the
    pipeline measures the training confidence.
    """

    def __init__(self, config: dict, plan: dict, role: str, engine=None):
        if engine is None:
            super().__init__(config)
        else:  # an engine built elsewhere (tests use a deterministic fake)
            self.config = config_from_dict(config)
            self.engine = engine
        self.plan = plan
        self.role = role

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for position, row in enumerate(rows):
            # Results are keyed by position: an id may repeat across eval sets (safety vs general).
            row["key"] = position
            row["wanted"] = self.plan.get(row["eval_set"], {})

        started = time.perf_counter()
        judged = judge_each(self.engine, [original_variant(r) for r in rows],
                            [set(r["wanted"].values()) & set(JUDGE_METHODS) for r in rows],
                            JudgeSettings.of(self.config))
        results = {(row["key"], method): j for row, found in zip(rows, judged) for method, j in found.items()}
        judging = time.perf_counter()
        results.update(self.consistency([r for r in rows if set(r["wanted"].values()) & SAMPLING_METHODS]))
        sampling = time.perf_counter()
        verdicts = self.verdict_consistency(rows, results)
        log.info("%s eval batch: %d questions; greedy, option scores and P(True) %.1f s, sampling %.1f s, verdicts "
                 "on variants %.1f s", self.role, len(rows), judging - started, sampling - judging,
                 time.perf_counter() - sampling)

        out = []
        for row in rows:
            for name, method in row["wanted"].items():
                out.append({**self._prediction(row, name, results[row["key"], method]),
                            "verdict_consistent": verdicts.get((row["key"], name))})
        return pa.Table.from_pylist(out, schema=PREDICTION_SCHEMA)

    def verdict_consistency(self, rows: list[dict], results: dict) -> dict:
        """{(row key, reported method): whether its answer is the same on the question and on each of its rule
        variants (shuffled, polarity-flipped, relabelled, reframed: the same question, so the same verdict), mapped
        back to the original's options} for the safety questions and the methods of eval.verdict_methods. Guard
        users need verdicts that do not flip when a prompt is reworded. An unreadable answer counts as a flip."""
        measured = set(self.config.eval.verdict_methods)
        todo = [(row, name, method) for row in rows if row["eval_set"] == "safety"
                for name, method in row["wanted"].items() if name in measured and method in JUDGE_METHODS]
        if not todo:
            return {}
        mutation = self.config.mutation
        variants, wanted, owner = [], [], []  # every rule variant once, with the methods its question wants
        methods_of = defaultdict(set)
        for row, _, method in todo:
            methods_of[row["key"]].add(method)
        for row in rows:
            if row["key"] not in methods_of:
                continue
            mutated = mutate_rules(row, mutation.operators, mutation.variants_per_question, mutation.seed)
            for variant in mutated["variants"][1:]:  # the original was judged already
                variants.append(variant)
                wanted.append(methods_of[row["key"]])
                owner.append(row["key"])
        judged = judge_each(self.engine, variants, wanted, JudgeSettings.of(self.config)) if variants else []
        answers = defaultdict(lambda: defaultdict(list))  # key -> method -> answers in the original's order
        for key, variant, found in zip(owner, variants, judged):
            for method, judgement in found.items():
                choice = judgement.choice
                answers[key][method].append(None if choice is None else variant["option_map"][choice])
        verdicts = {}
        for row, name, method in todo:
            on_variants = answers[row["key"]][method]
            original = results[row["key"], method].choice
            verdicts[row["key"], name] = (None if not on_variants else
                                          original is not None and all(a == original for a in on_variants))
        return verdicts

    def _prediction(self, row: dict, method: str, judgement: Judgement) -> dict:
        # The evaluation asks the original variant: its option order is the question's.
        unsafe = row.get("unsafe_option")
        return {
            "id": row["id"], "source": row.get("source"), "eval_set": row["eval_set"], "split": row.get("split"),
            "lang": row["lang"], "task": row["task"], "category": row["category"], "answer": row["answer"],
            "unsafe_option": unsafe, "num_options": len(row["options"]), "role": self.role, "method": method,
            "choice": judgement.choice, "confidence": judgement.confidence, "option_probs": judgement.probs,
            "p_unsafe": unsafe_probability(judgement.choice, judgement.confidence, judgement.probs, unsafe,
                                           len(row["options"])),
            "fallback": judgement.fallback, "text": judgement.text, "truncated": judgement.truncated,
        }

    def consistency(self, rows: list[dict]) -> dict:
        """Self- and mutation consistency from one sampling call (k samples of the original and its variants)."""
        if not rows:
            return {}
        mutation = self.config.mutation
        mutated = []
        for row in rows:
            # only the original is sampled where mutation consistency is not wanted
            count = mutation.variants_per_question if "mutation_consistency" in row["wanted"].values() else 0
            mutated.append(mutate_rules(row, mutation.operators, count, mutation.seed))
        self.mutate_with_llm(mutated)
        self.sample(mutated)
        found = {}
        for row in mutated:
            cuts = [v.get("prompt_truncated") for v in row["variants"]]  # set by EngineStage.sample, as it drew them
            for method, count in (("mutation_consistency", len(row["variants"])), ("self_consistency", 1)):
                scored = question_confidence({**row, "variants": row["variants"][:count]})
                found[row["key"], method] = Judgement(scored["majority_answer"], scored["agreement"] or 0.0, False,
                                                      None, any(cuts[:count]))
        return found
