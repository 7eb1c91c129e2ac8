"""`run_evaluation`: every confidence method on held-out safety questions, base model vs fine-tuned adapter,
on Ray Data with the pipeline's engines; then metrics, selective judgement, over-refusal, general ability,
plots and the report.

One Ray Data pass per model (base, then base + adapter), each over all three question sets at once (safety,
general, over-refusal), so each model is loaded once per engine actor.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from importlib import resources

import pyarrow as pa

from safeconf import io
from safeconf.config import Config
from safeconf.evaluation import plots, report
from safeconf.evaluation.methods import (
    ADAPTER_METHODS,
    METHODS,
    POSTHOC_METHODS,
    PREDICTION_SCHEMA,
    engine_method,
)
from safeconf.evaluation.posthoc import calibrate_posthoc
from safeconf.evaluation.stage import EvalStage
from safeconf.evaluation.results import (
    ESTIMATORS,
    correctness,
    general_ability,
    method_summary,
    over_refusal,
    sample_size_warnings,
    truncated_prompts,
)
from safeconf.data.ingest import ingest
from safeconf.ray_utils import engine_actors, init_ray, map_on_engines, question_dataset
from safeconf.schema import QUESTION_FIELDS

log = logging.getLogger(__name__)

BUNDLED_GENERAL = "general"
EVAL_FIELDS = QUESTION_FIELDS + [pa.field("eval_set", pa.string()), pa.field("split", pa.string())]
# General ability and over-refusal, before and after fine-tuning. token_prob_instructed scores the option labels on
# the prompt SafeConf trains and serves on (with the reply-format instruction); token_prob on the bare scoring
# prompt, which fine-tuning never sees: a shift there says little about the served judge (RESULTS.md).
AUX_METHODS = {"verbalized": "verbalized", "token_prob": "token_prob", "token_prob_instructed": "token_prob_instructed"}
PLOTS = {
    "reliability.png": "Reliability diagrams",
    "risk_coverage.png": "Risk-coverage curves",
    "confidence_histograms.png": "Confidence histograms",
}


def run_evaluation(config: Config, data_spec: str, out_uri: str, model: str | None = None,
                   adapter: str | None = None) -> dict:
    """Evaluate every method of `config.eval.methods` on the questions of `data_spec`.

    `model` replaces config.model.name; `adapter` (a LoRA folder; default config.model.adapter where the
    config has one) is the SafeConf fine-tune: its verbalized confidence is the `safeconf` method, and general
    ability and over-refusal are measured with and without it. Writes OUT/metrics.json, OUT/report.md,
    OUT/report.html, the PNG plots, OUT/predictions/{base,adapter}/ (one row per question and method) and
    OUT/rejects.parquet; returns the metrics.json content. metrics.json["warnings"] lists, as plain sentences,
    what the report flags at its top: calibration or held-out sets too small for what is asked of them (and how
    many questions they need), degenerate methods, prompts cut to fit the context.
    """
    started = time.time()
    config.validate()
    out = io.normalise_uri(out_uri)
    io.make_dirs(out)
    roles = role_configs(config, model, adapter)
    notes = method_notes(config, has_adapter="adapter" in roles)
    safety, read, rejects = load_safety(data_spec, config, out)
    general, general_note = load_aux(config.eval.general_data, config.eval.aux_limit, "general")
    refusal, refusal_note = load_aux(config.eval.over_refusal_data, config.eval.aux_limit, "over_refusal", safe_only=True)
    notes += [n for n in (general_note, refusal_note) if n]
    questions = pa.Table.from_pylist(safety + general + refusal, schema=pa.schema(EVAL_FIELDS))

    init_ray(config.ray_address)
    predictions, fitted = [], {}
    present = set(questions.column("eval_set").to_pylist())
    for role, role_config in roles.items():
        plan = method_plan(config.eval.methods, role)
        if not any(plan[name] for name in present):
            continue  # e.g. methods=[safeconf] without an adapter: nothing for this model to do
        log.info("evaluating %s model on %d questions: %s", role, questions.num_rows, plan)
        began = time.time()
        rows, found = predict(questions, role_config, plan, role, io.join(out, "predictions", role))
        predictions += rows
        fitted.update(found)
        log.info("%s model done in %.0f s", role, time.time() - began)

    began = time.time()
    summary = summarise(predictions, config, data_spec, roles, read, rejects, notes, fitted)
    log.info("metrics with %d bootstrap resamples in %.0f s", config.eval.bootstrap_samples, time.time() - began)
    images = write_plots(out, [p for p in predictions if p["eval_set"] == "safety"], summary, config)
    summary["plots"] = {name: PLOTS[name] for name in images}
    summary["seconds"] = round(time.time() - started, 1)
    summary["config"] = config.to_dict()
    io.write_json(io.join(out, "metrics.json"), summary)
    document = report.build(summary, summary["plots"])
    _write_bytes(io.join(out, "report.md"), document.markdown().encode("utf-8"))
    _write_bytes(io.join(out, "report.html"), document.html(images).encode("utf-8"))
    log.info("evaluation written to %s (%.0f s)", out, summary["seconds"])
    return summary


def method_notes(config: Config, has_adapter: bool) -> list[str]:
    """The report's notes on how the evaluated methods count fallbacks, fit, and what was skipped."""
    notes = [f"verbalized / safeconf: a reply that states no confidence counts as {config.eval.missing_confidence} "
             "(eval.missing_confidence); the share is the method's fallback rate. An unreadable answer counts as wrong.",
             "p_true: when the greedy reply is unreadable, the token_prob answer is proposed (its fallback rate)."]
    if "token_prob_temperature" in config.eval.methods:
        notes.append("token_prob_temperature: its temperature is fitted on the calibration split, which its overall "
                     "figures include; compare it with the others on the test split alone.")
    if {"token_prob_batch", "token_prob_contextual"} & set(config.eval.methods):
        notes.append("token_prob_batch divides by the mean option distribution over every evaluated question of a "
                     "data set and option count (no labels used); token_prob_contextual by the distribution of a "
                     f"content-free input ({config.eval.content_free_inputs}) with the same options.")
    adapter_only = [m for m in config.eval.methods if m in ADAPTER_METHODS]
    if adapter_only and not has_adapter:
        notes.append(f"{', '.join(adapter_only)} skipped: no adapter given (pass the fine-tuned LoRA folder).")
    if "adapter_token_prob" in config.eval.methods:
        notes.append("adapter_token_prob: the fine-tuned model's option-label probability after the answer prefix, on "
                     "the prompt it was trained on (with the reply-format instruction); answer = the likeliest "
                     "option. The confidence of an adapter trained with sft.confidence_format=none, which states none.")
    return notes


# --- which model runs which method ---


def role_configs(config: Config, model: str | None, adapter: str | None) -> dict[str, Config]:
    """{"base": config without adapter, "adapter": config with it (only when there is one)}."""
    adapter = adapter or config.model.adapter
    base = copy.deepcopy(config)
    if model:
        base.model.name = model
    base.model.adapter = ""
    roles = {"base": base}
    if adapter:
        tuned = copy.deepcopy(base)
        tuned.model.adapter = adapter
        roles["adapter"] = tuned
    return roles


def method_plan(methods: list[str], role: str) -> dict[str, dict[str, str]]:
    """{eval set: {reported name: engine method}} for one model."""
    if role == "base":  # the post-hoc calibrations run token_prob's scoring (POSTHOC_METHODS), calibrated after
        safety = {m: engine_method(m) for m in methods if m in METHODS or m in POSTHOC_METHODS}
    else:
        safety = {m: engine_method(m) for m in methods if m in ADAPTER_METHODS}
    return {"safety": safety, "general": dict(AUX_METHODS), "over_refusal": dict(AUX_METHODS)}


# --- questions ---


def calibration_split(question_id: str, fraction: float, seed: int) -> str:
    """'calibration' or 'test', by a hash of the id: stable across runs and methods."""
    digest = hashlib.sha256(f"eval:{seed}:{question_id}".encode("utf-8")).digest()
    return "calibration" if int.from_bytes(digest[:8], "big") / 2**64 < fraction else "test"


def load_safety(spec: str, config: Config, out: str) -> tuple[list[dict], int, int]:
    questions, rejects, read = ingest(spec, config.limit)
    io.write_table(io.join(out, "rejects.parquet"), rejects)
    if rejects.num_rows:
        log.warning("%d of %d rows rejected; reasons in %s", rejects.num_rows, read, io.join(out, "rejects.parquet"))
    if questions.num_rows == 0:
        raise ValueError(f"no usable questions in {spec!r}: {read} read, all rejected (see rejects.parquet)")
    ev = config.eval
    rows = []
    for q in questions.to_pylist():
        split = None if q["answer"] is None else calibration_split(q["id"], ev.calibration_fraction, ev.seed)
        rows.append({**q, "eval_set": "safety", "split": split})
    return rows, read, rejects.num_rows


def resolve_aux_spec(spec: str) -> str:
    if spec == BUNDLED_GENERAL:
        return "jsonl:" + str(resources.files("safeconf.data").joinpath("general").joinpath("questions.jsonl"))
    return spec


def load_aux(spec: str, limit: int, name: str, safe_only: bool = False) -> tuple[list[dict], str | None]:
    """Rows of an auxiliary set (general ability, over-refusal), or none and a note saying why."""
    if not spec:
        return [], f"{name} skipped: eval.{name}_data is empty."
    questions, rejects, read = ingest(resolve_aux_spec(spec), 0 if safe_only else limit)
    rows = questions.to_pylist()
    note = f"{name}: {rejects.num_rows} of {read} rows of {spec} rejected at the door." if rejects.num_rows else None
    if safe_only:  # the safe look-alikes: option 0 (Safe) is right
        rows = [r for r in rows if r["answer"] == 0][: limit or None]
    if not rows:
        return [], f"{name} skipped: no usable rows in {spec}."
    return [{**r, "eval_set": name, "split": None} for r in rows], note


# --- the engine passes ---


def predict(questions: pa.Table, config: Config, plan: dict, role: str, uri: str) -> tuple[list[dict], dict]:
    """Run EvalStage over the questions on an actor pool, then the post-hoc calibrations (calibrate_posthoc) over
    all of its rows; the predictions are written to `uri` and returned, with what the calibrations fitted."""
    with engine_actors(config.engine) as placement:  # placement groups freed when this pass is done
        ds = map_on_engines(question_dataset(questions, config.engine.batch_size), EvalStage, config, placement,
                            plan=plan, role=role)
        ds.write_parquet(uri, mode="overwrite")  # a re-run replaces the old predictions, never mixes with them
    rows = io.read_table(uri).cast(PREDICTION_SCHEMA).to_pylist()
    if not any(r["method"] in POSTHOC_METHODS for r in rows):
        return rows, {}
    rows, fitted = calibrate_posthoc(rows)
    fs, path = io.filesystem(uri)
    fs.delete_dir_contents(path)  # the calibrated rows replace the engine pass's
    io.write_table(io.join(uri, "predictions.parquet"), pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA))
    return rows, fitted


# --- numbers, plots, report ---


def summarise(predictions: list[dict], config: Config, data_spec: str, roles: dict, read: int, rejected: int,
              notes: list[str], fitted: dict | None = None) -> dict:
    """metrics.json from the predictions; `fitted`: what calibrate_posthoc fitted per method (the temperature,
    the batch priors), kept in that method's entry under "calibration"."""
    safety = [p for p in predictions if p["eval_set"] == "safety"]
    by_method = {}
    for row in safety:
        by_method.setdefault(row["method"], []).append(row)
    order = [m for m in config.eval.methods if m in by_method]
    first = by_method[order[0]] if order else []
    without_gold = sum(1 for r in first if r["answer"] is None)
    ev = config.eval
    summary = {
        "data": data_spec,
        "model": roles["base"].model.name,
        "adapter": getattr(roles["adapter"].model, "adapter", None) if "adapter" in roles else None,
        "rows_read": read,
        "rows_rejected": rejected,
        "questions": len(first),
        "with_gold": len(first) - without_gold,
        "without_gold": without_gold,
        "coverage_levels": [float(c) for c in ev.coverage_levels],
        "bootstrap_samples": ev.bootstrap_samples,
        "methods": method_summaries(by_method, order, ev),
        "estimators": ESTIMATORS,
        "truncated_prompts": truncated_prompts(predictions),
    }
    for key, name, spec, scorer in (
        ("general_ability", "general", ev.general_data, lambda rows: general_ability(rows, ev)),
        ("over_refusal", "over_refusal", ev.over_refusal_data, over_refusal),
    ):
        rows = [p for p in predictions if p["eval_set"] == name]
        summary[key] = {"data": spec, "results": scorer(rows)} if rows else {"skipped": _skip_reason(notes, name)}
    for method, found in (fitted or {}).items():
        if method in summary["methods"]:
            summary["methods"][method]["calibration"] = found
    summary["notes"] = notes
    summary["warnings"] = sample_size_warnings(summary, ev)
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    return summary


def method_summaries(by_method: dict, order: list[str], config) -> dict:
    """method_summary of every method, as parallel Ray tasks where Ray is running: the bootstrap over every
    breakdown costs about 2.5 ms per resample, group and method, minutes on one core for a real run."""
    import ray

    if not ray.is_initialized():
        return {m: method_summary(by_method[m], config) for m in order}
    task = ray.remote(method_summary)
    return dict(zip(order, ray.get([task.remote(by_method[m], config) for m in order])))


def _skip_reason(notes: list[str], name: str) -> str:
    return next((n.split(": ", 1)[1] for n in notes if n.startswith(f"{name} skipped")), "no rows")


def write_plots(out: str, safety: list[dict], summary: dict, config: Config) -> dict[str, bytes]:
    """The PNGs beside the report; {file name: PNG bytes}."""
    scores = {}
    for method in summary["methods"]:
        conf, right = correctness([r for r in safety if r["method"] == method])
        if right.size:
            scores[method] = (conf, right)
    if not scores:
        return {}
    figures = {
        "reliability.png": plots.reliability_diagrams(scores, config.eval.ece_bins),
        "risk_coverage.png": plots.risk_coverage_curves(scores),
        "confidence_histograms.png": plots.confidence_histograms(scores, config.eval.ece_bins),
    }
    for name, png in figures.items():
        _write_bytes(io.join(out, name), png)
    return figures


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = io.filesystem(uri)
    with fs.open_output_stream(path) as stream:
        stream.write(data)
