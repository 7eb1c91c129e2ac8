"""The SafeConf data pipeline on Ray Data.

questions -> validate -> mutate (rules inline) -> engine actors (LLM mutations, then every variant x k
samples) -> confidence map -> confidence table -> fine-tuning set. One row per original question all
the way through: variants and samples are list columns, so every stage is a map and nothing shuffles.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import pyarrow as pa

from safeconf import io
from safeconf.config import Config, MutationConfig, config_from_dict
from safeconf.confidence import question_confidence
from safeconf.data.stream import count_values, question_stream
from safeconf.engines.base import draw_labels, label_rng, prompt_cut
from safeconf.mutations import LLM_OPERATORS, mutate_rules
from safeconf.prompts import ANSWER_PREFIX, answer_text, render_messages
from safeconf.replies import parse_answer
from safeconf.ray_utils import (LIGHT_TASK_CPUS, EnginePlacementGroups, engine_actors, init_ray, map_on_engines,
                                question_dataset)
from safeconf.schema import CONFIDENCE_SCHEMA, MUTATED_SCHEMA
from safeconf.sft import build_sft

log = logging.getLogger(__name__)


# --- stages: each takes and returns a pyarrow batch of whole question rows ---


def mutate_batch(batch: pa.Table, mutation: MutationConfig) -> pa.Table:
    """The rule variants of a batch's questions (the mutation settings travel once per task, not a whole config)."""
    rows = [mutate_rules(q, mutation.operators, mutation.variants_per_question, mutation.seed) for q in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=MUTATED_SCHEMA)


def confidence_batch(batch: pa.Table) -> pa.Table:
    return pa.Table.from_pylist([question_confidence(r) for r in batch.to_pylist()], schema=CONFIDENCE_SCHEMA)


class EngineStage:
    """A Ray Data actor holding one engine (one model copy).

    It makes the LLM mutations of a batch (one engine call) and then samples every variant k times
    (one engine call for the batch). Both steps need the same model, so they share the actor instead of
    loading it twice.
    """

    def __init__(self, config: dict, engine=None):
        import ray

        from safeconf.engines import make_engine

        logging.basicConfig(level=logging.INFO)  # the per-batch timings below, in the actor's log
        self.config = config_from_dict(config)
        # `engine`: one built elsewhere (tests pass a fake); else the configured one, loaded in this actor
        if engine is None:
            engine = make_engine(self.config.model, self.config.engine, seed=self.config.sampling.seed)
        self.engine = engine
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            row["sampled_on"] = self.node_id  # where it ran: a multi-node run shows its engines' spread
        started = time.perf_counter()
        self.mutate_with_llm(rows)
        mutated = time.perf_counter()
        self.sample(rows)
        log.info(
            "engine batch: %d questions, LLM mutations %.1f s, sampling %d variants x %d in %.1f s",
            len(rows), mutated - started, sum(len(r["variants"]) for r in rows), self.config.sampling.k,
            time.perf_counter() - mutated,
        )
        return pa.Table.from_pylist(rows, schema=MUTATED_SCHEMA)

    def mutate_with_llm(self, rows: list[dict]) -> None:
        jobs = []  # (row, slot, operator)
        for row in rows:
            for pending in row["pending_llm"]:
                slot, name = pending.split(":", 1)
                jobs.append((row, int(slot), LLM_OPERATORS[name]))
            row["pending_llm"] = []
        mutation = self.config.mutation
        for row in rows:  # cut requests are counted (the engine cuts the middle of their text, Engine.fit_prompt)
            row["llm_prompts_truncated"] = 0
        for name, operator in LLM_OPERATORS.items():  # one engine call per operator (each has its own stop)
            mine = [(row, slot) for row, slot, op in jobs if op is operator]
            if not mine:
                continue
            requests = [operator.request(row) for row, _ in mine]
            for (row, _), request in zip(mine, requests):
                if prompt_cut(self.engine, request, mutation.llm_max_tokens):
                    row["llm_prompts_truncated"] += 1
            replies = self.engine.generate(
                requests,
                n=1,
                temperature=mutation.llm_temperature,
                max_tokens=mutation.llm_max_tokens,
                stop=list(operator.stop),
            )
            for (row, slot), (reply,) in zip(mine, replies):
                variant, garbled = operator.accept(row, reply.text, slot)
                if variant is None:
                    row["dropped"].append({"mutation": name, "reason": garbled, "text": reply.text})
                else:
                    row["variants"].append(variant)
        for row in rows:  # variants in slot order, whatever order the operators ran in
            row["variants"].sort(key=_slot_of)

    def sample(self, rows: list[dict]) -> None:
        """k samples of every variant of the rows, in sampling.answer_format (one engine call for the batch)."""
        variants = [v for row in rows for v in row["variants"]]
        if not variants:
            return
        if self.config.sampling.answer_format == "label":
            self.sample_labels(variants)
        else:
            self.sample_free(variants)

    def sample_labels(self, variants: list[dict]) -> None:
        """Every sample an answer: k labels drawn from the model's distribution over the variant's option labels
        as the first token after the reply's answer prefix (Engine.label_scores; labels whose first tokens collide
        are scored whole), at sampling.temperature and top_p over the labels, by an RNG seeded from
        (sampling.seed, variant id): constrained decoding of the answer token, from one scoring call."""
        sampling = self.config.sampling
        prefixes = [ANSWER_PREFIX[v["lang"]] for v in variants]
        prompts = [render_messages(v) for v in variants]
        scored = self.engine.label_scores(prompts, prefixes, [v["labels"] for v in variants])
        for variant, prefix, scores in zip(variants, prefixes, scored):
            rng = label_rng(sampling.seed, variant["variant_id"])
            picks = draw_labels(scores.logprobs, sampling.k, sampling.temperature, sampling.top_p, rng)
            variant["answer_format"] = "label-whole" if scores.whole_label else "label"
            variant["prompt_truncated"] = scores.truncated
            variant["samples"] = [
                {
                    "text": answer_text(prefix, variant["labels"][choice]),
                    "choice": choice,
                    "choice_original": variant["option_map"][choice],
                    "verbal_confidence": None,
                    "choice_logprob": scores.logprobs[choice],  # under the model, at temperature 1
                    "num_tokens": scores.num_tokens[choice],
                }
                for choice in picks
            ]

    def sample_free(self, variants: list[dict]) -> None:
        """k free-form replies per variant (n=k), read by the reply parser; an unreadable one has no choice."""
        sampling = self.config.sampling
        prompts = [render_messages(v) for v in variants]
        outputs = self.engine.generate(
            prompts,
            n=sampling.k,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            stop=sampling.stop,
        )
        for variant, messages, completions in zip(variants, prompts, outputs):
            variant["answer_format"] = "free"
            variant["prompt_truncated"] = prompt_cut(self.engine, messages, sampling.max_tokens)
            variant["samples"] = []
            for completion in completions:
                parsed = parse_answer(completion.text, variant["options"], variant["labels"])
                variant["samples"].append(
                    {
                        "text": completion.text,
                        "choice": parsed.choice,
                        "choice_original": None if parsed.choice is None else variant["option_map"][parsed.choice],
                        "verbal_confidence": parsed.confidence,
                        "choice_logprob": self.engine.token_logprob_at(completion, parsed.label_offset),
                        "num_tokens": len(completion.token_ids),
                    }
                )


def _slot_of(variant: dict) -> int:
    """Slot number from a variant id "<question id>#<slot>-<mutation>"; the original ("#original") is slot 0."""
    tail = variant["variant_id"].rsplit("#", 1)[1]
    return 0 if tail == "original" else int(tail.split("-", 1)[0])


# --- wiring ---


def build_dataset(questions, config: Config, stage_class=EngineStage,
                  placement: EnginePlacementGroups | None = None, **stage_kwargs):
    """The lazy Ray Dataset from accepted questions (a Ray Dataset, e.g. safeconf.data.stream.question_stream, or an
    Arrow table) to confidence rows. `stage_class`: EngineStage or a subclass (benchmarks/pipeline_throughput.py
    times its engine calls), with its extra constructor arguments; `placement`: where tensor-parallel engines get
    their placement groups (the caller removes them when the dataset is done)."""
    ds = question_dataset(questions, config.engine.batch_size) if isinstance(questions, pa.Table) else questions
    # batch_size: one engine batch per task, so Ray Data does not merge the engine-sized blocks back together
    ds = ds.map_batches(mutate_batch, batch_format="pyarrow", batch_size=config.engine.batch_size,
                        fn_kwargs={"mutation": config.mutation}, num_cpus=LIGHT_TASK_CPUS)
    ds = map_on_engines(ds, stage_class, config, placement, **stage_kwargs)
    return ds.map_batches(confidence_batch, batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)


def summarise(confidence_uri: str) -> dict:
    """Counts over the written confidence table: variants kept and dropped per mutation operator, samples and
    the unreadable ones, prompts cut to fit the context, mean confidence. Read a batch at a time, so the driver
    holds one batch of questions, not the table."""
    batches = io.iter_batches(confidence_uri, ["answer", "confidence", "variants", "dropped", "llm_prompts_truncated",
                                               "sampled_on"])
    variants_by_mutation, operators, formats = {}, {}, {}
    samples = unreadable = tokens = 0
    sampled = sampled_cut = llm_requests = llm_cut = 0
    questions = without_gold = confidence_sum = confidence_count = 0
    by_node = Counter()
    for row in (row for batch in batches for row in batch.to_pylist()):
        questions += 1
        without_gold += row["answer"] is None
        if row["confidence"] is not None:
            confidence_sum, confidence_count = confidence_sum + row["confidence"], confidence_count + 1
        by_node[str(row["sampled_on"])] += 1
        for variant in row["variants"]:
            mutation = variant["mutation"]
            variants_by_mutation[mutation] = variants_by_mutation.get(mutation, 0) + 1
            if mutation != "original":
                _operator_entry(operators, mutation)["kept"] += 1
            llm_requests += mutation in LLM_OPERATORS
            formats[variant["answer_format"]] = formats.get(variant["answer_format"], 0) + 1
            samples += len(variant["samples"])
            unreadable += sum(1 for s in variant["samples"] if s["choice"] is None)
            tokens += sum(s["num_tokens"] for s in variant["samples"])
            sampled += 1
            sampled_cut += bool(variant["prompt_truncated"])
        for drop in row["dropped"]:
            entry = _operator_entry(operators, drop["mutation"])
            entry["dropped"] += 1
            entry["dropped_by_reason"][drop["reason"]] = entry["dropped_by_reason"].get(drop["reason"], 0) + 1
            llm_requests += drop["mutation"] in LLM_OPERATORS
        llm_cut += row["llm_prompts_truncated"] or 0
    for entry in operators.values():
        entry["attempted"] = entry["kept"] + entry["dropped"]
    return {
        "questions": questions,
        "questions_without_gold": without_gold,
        "variants_by_mutation": variants_by_mutation,
        # Per mutation operator: variants it was asked for (attempted) = kept + dropped, and why they were dropped.
        "mutations": {name: operators[name] for name in sorted(operators)},
        "variants_by_answer_format": formats,
        "samples": samples,
        "unreadable_samples": unreadable,  # no option could be read (answer_format=free); counted as wrong
        "unreadable_rate": unreadable / samples if samples else None,
        "generated_tokens": tokens,
        # Prompts cut in the middle of their question to fit the context; None: the engine could not tell.
        "truncated_prompts": {
            "sampling": {"prompts": sampled, "truncated": sampled_cut},
            "llm_mutations": {"prompts": llm_requests, "truncated": llm_cut},
        },
        "mean_confidence": confidence_sum / confidence_count if confidence_count else None,
        "questions_by_node": dict(sorted(by_node.items())),  # Ray node id of the engine actor -> questions sampled
    }


def _operator_entry(operators: dict, name: str) -> dict:
    return operators.setdefault(name, {"attempted": 0, "kept": 0, "dropped": 0, "dropped_by_reason": {}})


def run_pipeline(config: Config, stage_class=EngineStage) -> dict:
    """Run the whole data pipeline into `config.out`; return the summary (also written to summary.json). The
    questions stream from storage through Ray Data (safeconf.data.stream): validated on the workers, rejects into
    OUT/rejects/; the driver holds neither the questions nor their ids. `stage_class`: EngineStage or a subclass
    (benchmarks/pipeline_scale.py gives it a stand-in engine)."""
    import ray

    started = time.time()
    out = io.normalise_uri(config.out)
    io.make_dirs(out)
    rejects_uri, confidence_uri = io.join(out, "rejects"), io.join(out, "confidence")
    if io.exists(rejects_uri):  # a rerun's rejects replace the last run's
        io.delete(rejects_uri)
    init_ray(config.ray_address)
    # a missing path fails here, before any actor starts
    questions = question_stream(config.data, rejects_uri, config.limit, config.engine.batch_size)
    # overwrite: a rerun replaces the previous run's files instead of adding its own beside them
    with engine_actors(config.engine) as placement:  # placement groups freed for training when done
        build_dataset(questions, config, stage_class, placement).write_parquet(  # the CPUs of confidence_batch:
            confidence_uri, mode="overwrite", ray_remote_args={"num_cpus": LIGHT_TASK_CPUS})  # Ray Data fuses the two
    rejected = count_values(rejects_uri, ["field"])["field"]
    sampled = summarise(confidence_uri) if io.exists(confidence_uri) else {"questions": 0}
    accepted = sampled["questions"]
    read = accepted + sum(rejected.values())
    if rejected:
        log.warning("%d of %d rows rejected; reasons in %s", read - accepted, read, rejects_uri)
    if accepted == 0:
        raise ValueError(f"no usable questions in {config.data!r}: {read} read, all rejected (see {rejects_uri})")
    sft_counts = build_sft(confidence_uri, io.join(out, "sft"), config.sft)
    alive = {node["NodeID"] for node in ray.nodes() if node["Alive"]}

    summary = {
        "data": config.data,
        "rows_read": read,
        "rows_accepted": accepted,
        "rows_rejected": read - accepted,
        "rejected_by_field": rejected,
        "answer_format": config.sampling.answer_format,
        **sampled,
        # Nodes that sampled part of the questions and were gone by the end: Ray Data retried the batches they
        # held on the engine actors it restarted elsewhere; every question is in the confidence table once.
        "sampling_nodes_lost": sorted(n for n in sampled["questions_by_node"] if n != "None" and n not in alive),
        "sft": sft_counts,
        "seconds": round(time.time() - started, 1),
        "config": config.to_dict(),
    }
    io.write_json(io.join(out, "summary.json"), summary)
    return summary
