"""The RESULTS.md experiment in one command: guard-tuning, then SafeConf, its ablations and a learning curve on the
public safety sets in ../shared/data, with the embedded model.

    .venv/bin/python experiments/shared_data_run.py --out runs/experiment [--recipe experiments/recipes/public_safety.yaml]

The recipe (a YAML file; the default is the RESULTS.md experiment's) holds the draws of questions, the settings
every model runs with and the ablations; this script runs it on the stage machinery (safeconf.stages).

What it does, in order (every step reuses the stage code of safeconf.stages, each model in its own run directory,
so a rerun with the same out dir skips every step whose inputs are unchanged: stage markers and fingerprints):
  1. select     questions from the data files, read in place, written to OUT/data/*.jsonl (OUT/selection.json
                says how many of what): train from the train splits, held-out from the dev/val splits; seeded,
                balanced within each set over safe / unsafe (judgements) and the right option's position
                (multiple choice); train and held-out disjoint (asserted). Last, the guard pool (issue 20), from
                the same train files, disjoint from both (asserted); drawn after the others, so they are the same
                questions as without it (--guard-scale 0).
  1b. guard     main's guard stage (safeconf.guard) on the pool: plain SFT on the gold answers, merged into
                OUT/main/guard/merged, the model every later step uses; snapshots at --guard-curve pool examples,
                each (and the final adapter) evaluated on the held-out questions in OUT/guard_curve/<point>
                (adapter_token_prob on the base model; the point "untrained" is the base model's token_prob).
                --guard-curve-only evaluates the snapshots a running or stopped guard stage has written so far,
                and stops.
  2. main       jobs/full.py's pipeline -> train -> evaluate (safeconf.stages.run_job): ONE pipeline
                run on the train questions (mutate, k samples per variant, confidence, SFT set), SafeConf
                fine-tuned on all of them, and the evaluation
                of every base-model baseline (config.DEFAULT_EVAL_METHODS, the three post-hoc calibrations included)
                and of the fine-tuned model (safeconf, adapter_token_prob) on the held-out questions, with general
                ability and over-refusal before and after. With a guard pool this is the calibration experiment,
                in OUT/calibration, starting from the guard model: only the sets guard-tuning taught
                (the recipe's calibration sets: DiaSafety), its train questions plus 320 more, and a fresh held-out draw of 600
                that the guard curve (which chose the set) never saw.
  2b. base_model  every baseline on the untrained base model (OUT/base_model), on the same held-out questions: the
                rows kept beside the guard-tuned model's, with its general ability and over-refusal.
  3. models     OUT/models/<name>: an SFT set built from the main pipeline's confidence table (no new sampling:
                safeconf.sft.build_sft with that model's sft settings, on a nested subset of the train questions),
                then the train and evaluate stages (only that model's own methods; no base-model pass):
                  safeconf_25, safeconf_50   the learning curve (SafeConf on 25% and 50%; the 100% point is main)
                  no_confidence   (a) sft.confidence_format=none: plain fine-tuning on the gold answers; evaluated by
                                      adapter_token_prob (its option probability), since it states no confidence
                  original_only   (b) sft.confidence_from=original: confidence from the original question's k samples
                  majority        (c) sft.target=majority: the model's own majority answer, no gold labels
                The ablations train on --ablation-fraction of the train questions (default 0.25: the same
                nested subset as safeconf_25, their like-for-like comparison; results.json names it as each
                ablation's compare_with). Every fine-tuned model is also evaluated with adapter_token_prob, so
                (a) has a same-method partner in each.
  4. results    OUT/results.json: per model and method the metrics.json entries (overall, test split, per data set,
                language, task, category, selective threshold), general ability and over-refusal, SFT and training
                summaries, wall time per step, sizes, seeds and the command.

Chosen sizes (--scale 1):
  train    1,040 questions: DiaSafety train 320 (en judgements), COLD train 320 (zh judgements), SafetyBench zh
           subset 300 (50 safe + 50 unsafe Yes / No judgements, 50 multiple-choice per answer position A-D),
           XSTest 100 (en, 50 safe + 50 unsafe); 3% of them (by a hash of the id) are the training's validation
           split, ~1,010 are trained on. Each set balanced over safe / unsafe (judgements) and the right option's
           position (multiple choice); the sets are not equal in size (XSTest has 450 prompts in all).
  held-out 560 questions: DiaSafety val 140, COLD dev 140, SafetyBench dev_en + dev_zh all 70 (en and zh, not
           balanced), 90 more from the SafetyBench zh subset (drawn from what the train draw left, so disjoint),
           XSTest 120 of the prompts not used for training (60 safe + 60 unsafe). Held-out candidates whose text
           equals a training question's are left out (2 in COLD dev; counted in selection.json).
  guard    4,000 questions: DiaSafety train 2,400 and COLD train 1,000 (each balanced safe / unsafe), SafetyBench zh
           subset 600 (a plain random draw of what train and held-out left); 2% are the guard training's
           validation split; ~3,910 trained on (15 over train.max_length=512 tokens are skipped), ~817k tokens:
           DiaSafety ~151 tokens an example, COLD ~266, SafetyBench ~315 (Chinese costs SmolLM2 several tokens a
           character). LoRA r=16 on all seven projections, lr 5e-4, 1 epoch, micro-batch 4 (guard.* defaults).
  calibration (with a guard pool) train 640 DiaSafety questions (the 320 above + 320 more from its train file),
           held-out 600 (a fresh balanced draw from DiaSafety val, none of the 140 above); examples trained: main
           ~620, safeconf_50 ~310, safeconf_25 and each ablation ~155.
  general  100 (MMLU test 50, CMMLU test 50); over-refusal: the XSTest safe prompts not used for training (200;
           some are held-out questions too).
  pipeline rule operators only: shuffle, polarity, relabel, framing (used in turn: a judgement gets shuffle,
           polarity, relabel; a multiple-choice question shuffle, relabel, framing), 3 variants + the original
           per question, k=10 label samples per variant (drawn from one scoring pass per variant: k costs
           nothing). The LLM operators (paraphrase, translate: ~70 generated tokens per variant) are left out
           for time; the original_only ablation measures what the rule variants add.
  training sft.include_variants=false (one example per question, the original prompt), 1 epoch, micro-batch 4,
           LoRA r=16, bf16 where the CPU has it. Examples trained: main ~1,010, safeconf_50 ~505, safeconf_25 and
           each ablation ~252: ~2,520 in all.
  eval     bootstrap 500 resamples (eval.bootstrap_samples; ~2.5 ms per resample for each method and group on
           a core, and a method has ~35 groups: overall, test split, data sets, languages, tasks, categories).

Estimated cost on the quiet 2-core machine, from the measured speeds (training ~250 tokens/s at ~210 tokens an
example, ~0.85 s an example; one label-sampling prefill per variant ~0.1 s; a base-model evaluation ~0.7 s a
question for all its methods, an adapter one ~0.25 s) and a smoke run (--scale 0.02, loaded machine):
  select 0.5 min; pipeline ~7 min (4,160 variants); main training ~15 min; main evaluation ~16 min (8 base
  methods, 2 adapter methods, general ability, over-refusal, bootstrap of 10 methods); safeconf_50 ~7 min
  training + ~4 min evaluation; safeconf_25 and the 3 ablations ~3.5 + ~4 min each (+ ~0.5 min start-up per
  training). About 85 minutes in all, estimated; the run in RESULTS.md took 74.3 min (its wall-time table:
  pipeline 8.0 min, main training 24.8 min, main evaluation 11.5 min). `--ablation-fraction 0.5` (ablations at
  the safeconf_50 size) adds ~11 minutes; `--ablations no_confidence` runs one ablation.

Guard-tuning's cost, measured (2026-12-04, an AMD EPYC without AVX-512, fp32): 92-98 tokens/s, so ~2.4 hours for
the 817k tokens of the pool alone; with it the whole experiment takes ~4-5 hours on that CPU, over the 2.5-hour
target (BENCHMARKS.md measured Ray Train at 322.8 tokens/s in bf16 on a CPU with AVX512-BF16, with attention-only
LoRA; this LoRA was not timed there). The guard stage checkpoints
every train.checkpoint_every steps and at each snapshot: a stopped run resumes where it stopped.
The calibration experiment's steps, measured (2026-12-05, the same CPU, with tests running beside it at times, so
upper bounds): each guard curve point's evaluation ~20 min (560 questions with verdict variants); the pipeline on
640 questions 19 min (4 variants each); SafeConf's training 15 min (626 examples, 157 steps, 130-190 tokens/s);
its evaluation (8 base methods and 2 adapter methods on 600 questions, general ability, over-refusal, verdict
variants) ~70 min. The whole experiment, guard-tuning included, is ~6 hours on this CPU.

Smoke run (a handful of questions, one training size, two optimizer steps a model; a 80-question guard pool):
    .venv/bin/python experiments/shared_data_run.py --out runs/smoke --scale 0.02 --guard-scale 0.02 \
        --guard-curve 20,40 --curve 1.0 --ablation-fraction 1.0 train.max_steps=2 sft.val_fraction=0.3 \
        eval.bootstrap_samples=20 guard.val_fraction=0.1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

from safeconf import io
from safeconf import stages as stage_runs
from safeconf.config import DEFAULT_EVAL_METHODS, Config, load_config

# scripts beside this one in experiments/ (on sys.path when it runs)
from results_json import assemble, environment, guard_entry_point, model_entry
from selection import (
    RECIPE,
    SHARED,
    describe,
    load_recipe,
    nested_order,
    select,
    subset,
    write_jsonl,
)

log = logging.getLogger("experiment")


ADAPTER_EVAL = ["safeconf", "adapter_token_prob"]


# --- runs ---


def model_config(base: Config, out: str, heldout: str, methods: list[str], sft: dict | None = None,
                 dataset: str = "", model: str = "", aux: bool | None = None) -> Config:
    """A model's config: its out dir and eval methods; `model` (the main run's guard-tuned model) replaces model.name
    and turns the guard stage off (it ran once, in main)."""
    config = copy.deepcopy(base)
    config.out = out
    if model:
        config.model.name = model
        config.guard.data = ""
    config.eval.data = heldout
    config.eval.methods = list(methods)
    config.train.dataset = dataset
    for key, value in (sft or {}).items():
        setattr(config.sft, key, value)
    if not (not dataset if aux is None else aux):  # adapter-only: no base-model pass for general ability or over-refusal
        config.eval.general_data = ""
        config.eval.over_refusal_data = ""
    return config.validate()


def run_evaluation_once(config: Config, out: str, data: str, adapter: str = "") -> dict:
    """One evaluation into OUT/eval, skipped when its marker says it is up to date (safeconf.stages.run_plan)."""
    plan = stage_runs.evaluate_plan(config, data, io.join(out, "eval"), adapter=adapter)
    return stage_runs.run_plan(plan, out)


def curve_steps(config: Config, examples: list[int]) -> dict[int, int]:
    """{optimizer step: pool examples trained by then} for the guard curve's points."""
    per_step = config.train.micro_batch_size * config.train.gradient_accumulation * config.train.num_workers
    return {max(1, round(n / per_step)): n for n in examples}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/experiment")
    parser.add_argument("--recipe", default=str(RECIPE), help="the experiment's recipe (experiments/recipes/*.yaml): its "
                        "draws, settings and ablations")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the question selection and the subsets (default: the recipe's)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every selection size (a smoke run: 0.02)")
    parser.add_argument("--curve", default="0.25,0.5,1.0",
                        help="training fractions of the learning curve (1.0 is the main run, always run)")
    parser.add_argument("--ablation-fraction", type=float, default=0.25,
                        help="training fraction of the ablations (the same nested subset as the curve's point)")
    parser.add_argument("--ablations", default=None, help="which of the recipe's ablations, comma-separated (default: all)")
    parser.add_argument("--guard-scale", type=float, default=1.0,
                        help="multiply the guard pool's size (0: no guard-tuning; every model starts from the base "
                        "model, as before issue 20)")
    parser.add_argument("--guard-curve", default="1000,2000",
                        help="pool examples at which the guard adapter is snapshot and evaluated on the held-out "
                        "questions (the whole pool is always a point); 'none': no curve at all (no snapshots, nothing "
                        "evaluated: e.g. a guard-tuning that continues from a guard model named as model.name)")
    parser.add_argument("--base-methods", default=",".join(DEFAULT_EVAL_METHODS),
                        help="the eval methods of the untrained base model's rows (step 2b); fewer is faster, none skips them")
    parser.add_argument("--calibration-methods", default=",".join(DEFAULT_EVAL_METHODS + ["adapter_token_prob"]),
                        help="the eval methods of the calibration experiment's run (step 2 with a guard pool); fewer "
                        "is faster (verbalized, self_consistency and p_true generate replies: most of its ~70 min)")
    parser.add_argument("--no-calibration-aux", action="store_true",
                        help="leave general ability and over-refusal out of the calibration run (~25 min less)")
    parser.add_argument("--guard-curve-only", action="store_true",
                        help="only evaluate the guard snapshots that exist so far (while, or after, the guard stage "
                        "ran; e.g. a stopped run's), into OUT/guard_curve.json; the full run reuses them")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, after the experiment's")
    args = parser.parse_intermixed_args(argv)
    try:
        args.recipe = load_recipe(args.recipe)
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"recipe {args.recipe}: {error}")
    args.seed = args.recipe.seed if args.seed is None else args.seed
    known = args.recipe.ablations
    args.ablations = list(known) if args.ablations is None else [a for a in args.ablations.split(",") if a]
    unknown = [a for a in args.ablations if a not in known]
    if unknown:
        parser.error(f"unknown ablations {unknown}; the recipe has {', '.join(known)}")
    args.curve = sorted({float(f) for f in args.curve.split(",") if f} | {1.0})
    if not all(0 < f <= 1 for f in args.curve + [args.ablation_fraction]):
        parser.error("training fractions must be in (0, 1]")
    return args


def select_step(args, out: Path, steps: dict) -> tuple[dict, dict, dict]:
    """1. the questions, written to OUT/data: (chosen rows, their SPECs, OUT/selection.json's content)."""
    began = time.time()
    chosen = select(SHARED, args.seed, args.scale, args.guard_scale, args.recipe)
    excluded = chosen.pop("excluded_as_train_duplicates")
    data = out / "data"
    specs = {name: write_jsonl(data / f"{name}_questions.jsonl", rows) for name, rows in chosen.items() if rows}
    selection = {name: describe(rows) for name, rows in chosen.items()}
    selection["heldout"]["excluded_as_train_duplicates"] = excluded
    io.write_json(str(out / "selection.json"), selection)
    steps["select"] = round(time.time() - began, 1)
    for name, entry in selection.items():
        log.info("%s: %d questions %s", name, entry["questions"], entry["by_source"])
    return chosen, specs, selection


def guard_step(args, base: Config, main_config: Config, specs: dict, out: Path, steps: dict) -> tuple[str, dict]:
    """1b. guard-tuning (main's guard stage), then its learning curve: each snapshot and the final adapter on the
    held-out questions (the guard model's option probability, adapter_token_prob on the base model). Returns the
    guard model and {curve point's out dir: pool examples trained}."""
    main_out = main_config.out
    no_curve = args.guard_curve == "none"
    curve_at = {} if no_curve else curve_steps(base, [int(n) for n in args.guard_curve.split(",") if n])
    main_config.guard.data = specs["guard"]
    main_config.guard.snapshot_steps = sorted(curve_at)
    if not args.guard_curve_only:
        steps["guard"] = stage_runs.run_job(main_config, ["guard"])
    guard_model = stage_runs.stage_config(main_config).model.name
    points = {f"step-{s}": (io.join(main_out, "guard", "snapshots", f"step-{s}"), n) for s, n in curve_at.items()}
    guard_train = io.join(main_out, "guard", "train_summary.json")
    if io.exists(guard_train):
        points["final"] = (io.join(main_out, "guard", "adapter"), io.read_json(guard_train)["examples"]["train"]["kept"])
    points["untrained"] = ("", 0)  # the curve's start: the untrained model's token_prob on the same questions
    if no_curve:
        points = {}
    guard_points = {}
    for name, (adapter, examples) in sorted(points.items(), key=lambda item: item[0] != "final"):
        # the final model first: the curve's main point, ready before the snapshots when a session is short
        if adapter and not io.exists(adapter):  # a snapshot step past the end of the pool
            continue
        point_out = str(out / "guard_curve" / name)
        method = "adapter_token_prob" if adapter else "token_prob"
        config = model_config(base, point_out, specs["heldout"], [method], aux=False)
        if not adapter:  # the untrained start of the curve: its accuracy, not its verdicts (saves ~20 min)
            config.eval.verdict_methods = []
        steps[f"guard_curve_{name}"] = {"evaluate": run_evaluation_once(config, point_out, specs["heldout"], adapter)}
        guard_points[point_out] = examples
    return guard_model, guard_points


def model_steps(args, base: Config, chosen: dict, specs: dict, train: str, heldout: str, main_out: str,
                guard_model: str, summary: dict, steps: dict) -> dict:
    """3. the learning curve's smaller models and the ablations, each from the main pipeline's confidence table
    (OUT/models/<name>); returns results.json's "models", the main SafeConf model first."""
    order = nested_order(chosen[train], args.seed)
    planned = {f"safeconf_{round(f * 100)}": ({}, ADAPTER_EVAL, f"SafeConf on {f:.0%} of the train questions", f)
               for f in args.curve if f < 1}
    ablations = args.recipe.ablations
    planned.update({name: (ablations[name]["sft"], ablations[name]["methods"], ablations[name]["about"],
                           args.ablation_fraction) for name in args.ablations})
    models = {"safeconf": {**model_entry(main_out, "SafeConf (main): confidence over the original and its variants",
                                         1.0, summary.get("sft"), steps["main"]),
                           "train_questions": len(chosen[train])}}
    for name, (sft, methods, description, fraction) in planned.items():
        model_out = str(Path(main_out).parent / "models" / name)
        ids = subset(order, fraction)
        config = model_config(base, model_out, specs[heldout], methods, sft, dataset=io.join(model_out, "sft"),
                              model=guard_model)
        # their scores, not their verdicts under mutation: those are the main model's and token_prob's (scoring every
        # held-out question's variants triples an evaluation: ~45 instead of ~12 min on the 2-core machine)
        config.eval.verdict_methods = []
        built = stage_runs.run_plan(stage_runs.sft_plan(config, main_out, model_out, ids), model_out)
        done = {"sft": {"stage_seconds": built["stage_seconds"], "status": built["status"]},
                **stage_runs.run_job(config, ["train", "evaluate"])}
        steps[name] = done
        models[name] = {**model_entry(model_out, description, fraction, stage_runs.sft_counts(model_out), done),
                        "train_questions": len(ids), "sft_settings": sft}
        if name in ablations:  # SafeConf trained on the same questions, where the curve has that size
            same = "safeconf" if fraction == 1.0 else f"safeconf_{round(fraction * 100)}"
            models[name]["compare_with"] = same if same == "safeconf" or same in planned else None
        log.info("%s done: %s", name, done)
    return models


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not SHARED.exists():
        raise SystemExit(f"shared data not found at {SHARED} (set SAFECONF_SHARED_DATA)")
    started = time.time()
    out = Path(args.out).resolve()
    steps = {}
    chosen, specs, selection = select_step(args, out, steps)

    overrides = [f"data={specs['train']}", f"eval.general_data={specs['general']}",
                 f"eval.over_refusal_data={specs['over_refusal']}", *args.recipe.settings, *args.overrides]
    base = load_config(None, overrides)
    io.write_json(str(out / "environment.json"), environment(base))
    main_out = str(out / "main")
    main_config = model_config(base, main_out, specs["heldout"], DEFAULT_EVAL_METHODS + ["adapter_token_prob"])
    guard_model, guard_points = guard_step(args, base, main_config, specs, out, steps) if chosen["guard"] else ("", {})
    if args.guard_curve_only:
        curve = [{"examples": n, **guard_entry_point(p)} for p, n in sorted(guard_points.items(), key=lambda i: i[1])]
        io.write_json(str(out / "guard_curve.json"), {"points": curve, "steps": steps})
        print(json.dumps({"guard_curve": str(out / "guard_curve.json"), "steps": steps}, indent=2))
        return 0
    # 2. SafeConf on the guard-tuned model (or the base model without a pool): pipeline -> train -> evaluate. With a
    # guard model, on the calibration sets' questions in OUT/calibration (starting from main's merged guard model);
    # main keeps its guard stage, whose fingerprint names the train and held-out sets its pool is kept apart from
    train, heldout = "train", "heldout"
    if guard_model:
        train, heldout = "calibration_train", "calibration_heldout"
        base = load_config(None, [f"data={specs[train]}", *overrides[1:]])
        main_out = str(out / "calibration")
        main_config = model_config(base, main_out, specs[heldout], [m for m in args.calibration_methods.split(",") if m],
                                   model=guard_model, aux=not args.no_calibration_aux)
    steps["main"] = stage_runs.run_job(main_config, ["pipeline", "train", "evaluate"])  # skips what is up to date
    summary = io.read_json(io.join(main_out, "summary.json"))
    # 2b. the untrained model's baselines on the same questions: the rows kept beside the guard-tuned model's
    base_out = str(out / "base_model")
    base_methods = [m for m in args.base_methods.split(",") if m]
    if base_methods:  # --base-methods= skips these rows
        # aux=False: the untrained model's general ability and over-refusal are not run (they cost this CPU ~25 min;
        # the calibration run measures both before and after SafeConf on the model it starts from)
        base_config = model_config(base, base_out, specs[heldout], base_methods, aux=False)
        base_config.eval.verdict_methods = []  # reference rows: their scores, not their verdicts under mutation
        steps["base_model"] = {"evaluate": run_evaluation_once(base_config, base_out, specs[heldout])}
    models = model_steps(args, base, chosen, specs, train, heldout, main_out, guard_model, summary, steps)
    results = assemble(args, argv, base, selection, summary, main_out, base_out if base_methods else None,
                       guard_points, guard_model, train, heldout, models, steps, out, started)
    io.write_json(str(out / "results.json"), results)
    print(json.dumps({"results": str(out / "results.json"), "wall_seconds": results["wall_seconds"],
                      "sizes": results["sizes"], "steps": steps}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
