"""safeconf.stages: fingerprints, markers (skip / redo / --from) with stub stage runners, the CLI's defaults."""

import hashlib
import json
import logging
import os

import pytest

from safeconf import fingerprints, stages
from safeconf.cli import main as cli_main
from safeconf.config import describe_options, load_config


def config(tmp_path, *overrides):
    return load_config(overrides=[f"out={tmp_path / 'run'}", *overrides])


# --- fingerprints ---


def test_fingerprint_is_sha256_of_canonical_json_whatever_the_key_order():
    a = {"config": {"sampling.k": 4, "model.name": "embedded"}, "sft": {"stage": "pipeline", "fingerprint": "x"}}
    b = {"sft": {"fingerprint": "x", "stage": "pipeline"}, "config": {"model.name": "embedded", "sampling.k": 4}}
    expected = hashlib.sha256(
        b'{"config":{"model.name":"embedded","sampling.k":4},"sft":{"fingerprint":"x","stage":"pipeline"}}').hexdigest()
    assert fingerprints.fingerprint(a) == fingerprints.fingerprint(b) == expected
    assert fingerprints.fingerprint({"l": [1, 2]}) != fingerprints.fingerprint({"l": [2, 1]})  # list order is meaningful


@pytest.mark.parametrize("stage,key", [
    ("pipeline", "sampling.k=8"), ("pipeline", "mutation.seed=3"), ("pipeline", "limit=5"),
    ("pipeline", "engine.kind=hf"), ("pipeline", "sft.val_fraction=0.2"), ("pipeline", "model.dtype=float32"),
    ("train", "train.learning_rate=1e-3"), ("train", "train.num_workers=2"), ("train", "train.merge=true"),
    ("train", "train.max_steps=3"), ("train", "model.name=Qwen/Qwen2.5-7B-Instruct"),
    ("evaluate", "eval.alpha=0.2"), ("evaluate", "eval.bootstrap_samples=10"), ("evaluate", "sampling.k=8"),
])
def test_a_result_relevant_key_changes_the_fingerprint(tmp_path, stage, key):
    before = stages.job_plans(config(tmp_path))[stage].fingerprint
    assert stages.job_plans(config(tmp_path, key))[stage].fingerprint != before


@pytest.mark.parametrize("key", [
    "engine.concurrency=3", "engine.batch_size=4", "engine.num_cpus=2", "engine.cpu_threads=2",
    "engine.memory_gib=8", "model.cache_dir=/tmp/elsewhere", "train.cpus_per_worker=0.5", "train.cpu_threads=2",
    "train.log_every=1", "train.checkpoint_every=7", "train.max_failures=3", "train.storage_path=/tmp/ckpt",
    "train.run_name=other", "train.zero_stage=3", "train.offload_optimizer=true", "ray_address=auto", "engine.device=cpu",
    "train.gradient_checkpointing=true",
    "serve.port=9000",
])
def test_a_speed_or_placement_key_changes_no_fingerprint(tmp_path, key):
    before = {name: plan.fingerprint for name, plan in stages.job_plans(config(tmp_path)).items()}
    after = {name: plan.fingerprint for name, plan in stages.job_plans(config(tmp_path, key)).items()}
    assert after == before


def test_every_key_the_fingerprints_leave_out_is_a_config_key():
    keys = {key for key, _, _ in describe_options()}
    named = set(fingerprints.SPEED_ONLY) | set(fingerprints.CHECKPOINT_LAYOUT) | set(fingerprints.TRAIN_OUTPUT_ONLY) | set(fingerprints.SPEC_KEYS)
    named |= {k for ks in fingerprints.NOT_READ.values() for k in ks}
    assert named <= keys, named - keys
    assert {k.split(".")[0] for ks in fingerprints.READS.values() for k in ks} <= {k.split(".")[0] for k in keys}


def test_an_edited_data_file_changes_the_pipeline_fingerprint(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text('{"id": "a"}\n', encoding="utf-8")
    plan = lambda: stages.job_plans(config(tmp_path, f"data=jsonl:{data}"))["pipeline"]  # noqa: E731
    first = plan()
    assert plan().fingerprint == first.fingerprint
    os.utime(data, (1, 1))  # touched, same content: the content hash decides
    assert plan().fingerprint == first.fingerprint
    data.write_text('{"id": "b"}\n', encoding="utf-8")
    second = plan()
    assert second.fingerprint != first.fingerprint
    changes = fingerprints.changed_inputs(first.inputs, second.inputs)
    assert changes == [f"data.files.q.jsonl.sha256 {first.inputs['config']['data']['files']['q.jsonl']['sha256'][:12]} "
                       f"-> {second.inputs['config']['data']['files']['q.jsonl']['sha256'][:12]}"]


def test_large_files_are_identified_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprints, "CONTENT_HASH_MAX_BYTES", 4)
    big = tmp_path / "big.parquet"
    big.write_bytes(b"12345678")
    (entry,) = fingerprints.path_identity(str(big)).values()
    assert entry == {"size": 8, "mtime_ns": big.stat().st_mtime_ns}


def test_specs_without_files_are_identified_by_their_text(tmp_path):
    assert fingerprints.spec_identity("hf:org/set", "data") == "hf:org/set"
    assert fingerprints.spec_identity("Qwen/Qwen2.5-7B-Instruct", "model") == "Qwen/Qwen2.5-7B-Instruct"
    assert fingerprints.spec_identity("embedded", "model") == "embedded"
    assert fingerprints.spec_identity(str(tmp_path / "gone.jsonl"), "data")["files"] is None  # the stage will say so
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / ".lock").write_text("")
    assert list(fingerprints.spec_identity(str(folder), "model")["files"]) == ["adapter_config.json"]


def test_changed_inputs_name_the_keys_and_the_upstream_stage(tmp_path):
    old, new = stages.job_plans(config(tmp_path)), stages.job_plans(config(tmp_path, "sampling.k=8"))
    assert fingerprints.changed_inputs(old["pipeline"].inputs, new["pipeline"].inputs) == ["sampling.k 4 -> 8"]
    (line,) = fingerprints.changed_inputs(old["train"].inputs, new["train"].inputs)
    assert line.startswith("sft (the output of stage pipeline) " + old["pipeline"].fingerprint[:12] + " -> ")


# --- the training run's name ---


def write_sft(folder, rows: int):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        pq.write_table(pa.table({"messages": [[{"role": "user", "content": f"q{i}"}] for i in range(rows)]}),
                       folder / f"{split}.parquet")
    return folder


def test_the_training_run_name_changes_with_the_sft_set_and_the_result_config(tmp_path):
    cfg = config(tmp_path)
    sft = write_sft(tmp_path / "sft", 3)
    name = lambda c=cfg: fingerprints.train_run_name(c, stages.train_plan(c, str(sft), str(tmp_path / "t")).run_key)  # noqa: E731
    first = name()
    assert first.startswith("safeconf-train-") and len(first) == len("safeconf-train-") + 12
    assert name() == first  # same inputs: the same run, so an interrupted one resumes
    assert name(config(tmp_path, "train.cpus_per_worker=0.5", "train.merge=true")) == first  # merge: after fit
    assert name(config(tmp_path, "train.zero_stage=3")) != first  # another checkpoint layout: never resumed into
    assert name(config(tmp_path, "train.learning_rate=1e-3")) != first
    write_sft(sft, 4)  # a new SFT set in the same folder
    assert name() != first


def test_in_a_job_the_training_run_is_keyed_by_the_pipeline_fingerprint(tmp_path):
    a, b = stages.job_plans(config(tmp_path)), stages.job_plans(config(tmp_path, "sampling.k=8"))
    assert a["train"].run_key != b["train"].run_key
    assert a["train"].inputs["sft"] == {"stage": "pipeline", "fingerprint": a["pipeline"].fingerprint}
    assert a["train"].upstream == ("pipeline",) and a["evaluate"].upstream == ("pipeline", "train")
    own = stages.job_plans(config(tmp_path, f"train.dataset={write_sft(tmp_path / 'mine', 2)}"))
    assert own["train"].upstream == () and set(own["train"].inputs["sft"]) == {"train", "val"}


# --- markers with stub runners ---


@pytest.fixture
def stub_runners(monkeypatch):
    """Stage runners that write the files a real stage would and record their calls; no model, no Ray."""
    calls = []

    def pipeline(cfg):
        calls.append(("pipeline", {}))
        out = cfg.out
        os.makedirs(f"{out}/sft", exist_ok=True)
        for name in ("train.parquet", "val.parquet", "val_questions.parquet"):
            open(f"{out}/sft/{name}", "w").close()
        with open(f"{out}/summary.json", "w") as f:
            json.dump({"k": cfg.sampling.k}, f)
        return {"k": cfg.sampling.k, "config": {}}

    def train(cfg, dataset, out, run_key, fresh=False):
        calls.append(("train", {"dataset": dataset, "run_key": run_key, "fresh": fresh}))
        os.makedirs(f"{out}/adapter", exist_ok=True)
        return {"steps": 1}

    def evaluate(cfg, data, out, adapter="", model=None):
        calls.append(("evaluate", {"data": data, "adapter": adapter, "model": model}))
        os.makedirs(out, exist_ok=True)
        with open(f"{out}/metrics.json", "w") as f:
            json.dump({"warnings": ["calibration set of 4 questions: at least 22 are needed to set a threshold"]}, f)
        return {"methods": 1}

    def guard(cfg, out, run_key, fresh=False):
        calls.append(("guard", {"run_key": run_key, "fresh": fresh}))
        os.makedirs(f"{out}/guard/merged", exist_ok=True)
        with open(f"{out}/guard/guard_summary.json", "w") as f:
            json.dump({}, f)
        return {"model": f"{out}/guard/merged"}

    monkeypatch.setattr(stages, "RUNNERS", {"guard": guard, "pipeline": pipeline, "train": train, "evaluate": evaluate})
    return calls


def ran(calls):
    names = [name for name, _ in calls]
    calls.clear()
    return names


def test_a_rerun_skips_up_to_date_stages_and_redoes_changed_ones_with_their_dependants(tmp_path, stub_runners, caplog):
    caplog.set_level(logging.INFO, logger="safeconf.stages")
    out = tmp_path / "run"
    report = stages.run_job(config(tmp_path), list(stages.STAGES))
    assert ran(stub_runners) == ["pipeline", "train", "evaluate"]
    assert {s: r["status"] for s, r in report.items()} == {"guard": "off", **dict.fromkeys(stages.STAGES[1:], "ran")}
    marker = json.loads((out / "stages" / "pipeline.json").read_text())
    plans = stages.job_plans(config(tmp_path))
    assert marker["fingerprint"] == plans["pipeline"].fingerprint and marker["inputs"] == plans["pipeline"].inputs
    assert marker["summary"] == {"k": 4}

    caplog.clear()
    report = stages.run_job(config(tmp_path, "engine.concurrency=2"), list(stages.STAGES))  # speed only
    assert ran(stub_runners) == [] and {r["status"] for r in report.values()} == {"off", "up to date"}
    assert f"stage pipeline up to date (fingerprint {plans['pipeline'].fingerprint[:12]}); skipped" in caplog.text

    caplog.clear()
    stages.run_job(config(tmp_path, "sampling.k=8"), list(stages.STAGES))
    assert ran(stub_runners) == ["pipeline", "train", "evaluate"]
    assert "stage pipeline: inputs changed: sampling.k 4 -> 8; running it" in caplog.text
    assert "stage train: inputs changed: sft (the output of stage pipeline)" in caplog.text
    assert json.loads((out / "summary.json").read_text()) == {"k": 8}

    stages.run_job(config(tmp_path, "sampling.k=8", "train.learning_rate=1e-3"), list(stages.STAGES))
    assert ran(stub_runners) == ["train", "evaluate"]  # the pipeline's inputs did not change


def test_from_clears_what_it_redoes_and_trains_afresh(tmp_path, stub_runners):
    out = tmp_path / "run"
    stages.run_job(config(tmp_path), list(stages.STAGES))
    first_key = stub_runners[1][1]["run_key"]
    ran(stub_runners)
    (out / "train" / "merged").mkdir()  # left by an earlier train.merge=true run
    (out / "eval" / "stale.png").write_text("")
    seen = {}

    def train(cfg, dataset, out, run_key, fresh=False):  # what the stage finds when it starts
        run = os.path.dirname(out)
        seen.update(fresh=fresh, run_key=run_key, merged=os.path.exists(f"{out}/merged"),
                    eval_marker=os.path.exists(f"{run}/stages/evaluate.json"), stale=os.path.exists(f"{run}/eval/stale.png"))
        os.makedirs(f"{out}/adapter")
        return {}

    stages.RUNNERS["train"] = train
    report = stages.run_job(config(tmp_path), list(stages.STAGES), from_stage="train")
    assert seen == {"fresh": True, "run_key": first_key, "merged": False, "eval_marker": False, "stale": False}
    assert [s for s, r in report.items() if r["status"] == "ran"] == ["train", "evaluate"]
    assert ran(stub_runners) == ["evaluate"]


def test_a_missing_output_or_an_old_marker_redoes_the_stage(tmp_path, stub_runners):
    out = tmp_path / "run"
    stages.run_job(config(tmp_path), list(stages.STAGES))
    ran(stub_runners)
    os.rmdir(out / "train" / "adapter")
    (out / "stages" / "pipeline.json").write_text(json.dumps({"stage_seconds": 1.0, "finished": 0}))  # no fingerprint
    report = stages.run_job(config(tmp_path), list(stages.STAGES))
    assert report["pipeline"]["reason"] == "its marker records no inputs (written by an older safeconf)"
    assert report["train"]["reason"] == f"its output {out / 'train' / 'adapter'} is missing"
    assert ran(stub_runners) == ["pipeline", "train"]  # same fingerprints: evaluate stays up to date


def test_a_stage_left_out_of_stages_must_be_up_to_date(tmp_path, stub_runners):
    stages.run_job(config(tmp_path), list(stages.STAGES))
    ran(stub_runners)
    with pytest.raises(stages.StageOrderError, match=r"stage 'train' reads the output of stage 'pipeline', which is "
                       r"not up to date \(inputs changed: sampling.k 4 -> 8\); add pipeline to --stages"):
        stages.run_job(config(tmp_path, "sampling.k=8"), ["train", "evaluate"])
    assert ran(stub_runners) == []
    stages.run_job(config(tmp_path, "eval.alpha=0.2"), ["evaluate"])  # its upstreams are up to date
    assert ran(stub_runners) == ["evaluate"]


def test_a_failed_redo_leaves_no_marker_claiming_the_old_output(tmp_path, stub_runners):
    out = tmp_path / "run"
    stages.run_job(config(tmp_path), list(stages.STAGES))

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    stages.RUNNERS["train"] = broken
    failures = []
    with pytest.raises(RuntimeError):
        stages.run_job(config(tmp_path, "train.epochs=2"), list(stages.STAGES),
                       on_failure=lambda stage, error: failures.append((stage, str(error))))
    assert failures == [("train", "boom")]
    assert not (out / "stages" / "train.json").exists() and (out / "stages" / "pipeline.json").exists()


# --- the CLI: same plans, same defaults ---


def test_cli_evaluate_defaults_to_eval_data_else_the_runs_held_out_split(tmp_path, stub_runners, capsys):
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "val_questions.parquet").write_text("")
    assert cli_main(["evaluate", "--out", str(run / "eval")]) == 0  # --out RUN/eval: the run is the folder above
    (_, call), = stub_runners
    assert call == {"data": f"parquet:{run}/sft/val_questions.parquet", "adapter": "", "model": None}
    ran(stub_runners)

    (run / "train" / "adapter").mkdir(parents=True)
    assert cli_main(["evaluate", "--run", str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert stub_runners[0][1]["adapter"] == f"{run}/train/adapter"
    ran(stub_runners)

    assert cli_main(["evaluate", "--run", str(run), "--out", str(tmp_path / "e"), "eval.data=jsonl:held.jsonl"]) == 0
    assert stub_runners[0][1]["data"] == "jsonl:held.jsonl"
    ran(stub_runners)
    assert cli_main(["evaluate", "--data", "jsonl:x.jsonl", "--out", str(tmp_path / "e"), "eval.data=jsonl:y"]) == 0
    assert stub_runners[0][1]["data"] == "jsonl:x.jsonl"
    ran(stub_runners)

    # no run, no eval.data: an error, never the training questions (config.data)
    assert cli_main(["evaluate", "--out", str(tmp_path / "lonely" / "eval")]) == 1
    assert "no held-out questions: give --data SPEC, eval.data=SPEC, or --run DIR" in capsys.readouterr().err
    assert stub_runners == []


def test_cli_evaluate_of_a_guard_tuned_run_or_an_experiment_uses_its_guard_model(tmp_path, stub_runners):
    experiment = tmp_path / "experiment"
    run = experiment / "main"

    def trained(run_dir, model_name):
        for folder in ("stages", "sft", "train/adapter"):
            (run_dir / folder).mkdir(parents=True, exist_ok=True)
        (run_dir / "sft" / "val_questions.parquet").write_text("")
        marker = {"stage": "train", "inputs": {"config": {"model.name": model_name}}}
        (run_dir / "stages" / "train.json").write_text(json.dumps(marker))

    trained(run, stages.upstream("guard", "abc"))
    (run / "guard" / "merged").mkdir(parents=True)
    for given in (run, experiment):  # the run itself, or the experiment's output directory
        assert cli_main(["evaluate", "--run", str(given), "--data", "jsonl:mine.jsonl",
                         "--out", str(tmp_path / "mine")]) == 0
        (_, call), = stub_runners
        assert call == {"data": "jsonl:mine.jsonl", "adapter": f"{run}/train/adapter", "model": f"{run}/guard/merged"}
        ran(stub_runners)
    assert cli_main(["evaluate", "--run", str(run), "--model", "embedded", "--data", "jsonl:m.jsonl",
                     "--out", str(tmp_path / "m")]) == 0
    assert stub_runners[0][1]["model"] == "embedded"  # --model wins
    ran(stub_runners)

    # the experiment's calibration run (SafeConf started from main's guard model): the experiment stands for it
    calibration = experiment / "calibration"
    trained(calibration, str(run / "guard" / "merged"))
    assert cli_main(["evaluate", "--run", str(experiment), "--data", "jsonl:m.jsonl", "--out", str(tmp_path / "c")]) == 0
    (_, call), = stub_runners
    assert call["adapter"] == f"{calibration}/train/adapter" and call["model"] == f"{run}/guard/merged"
    ran(stub_runners)

    # a run trained on the user's own model: its adapter goes on that model, not on the default one
    own = tmp_path / "own"
    trained(own, "Qwen/Qwen2.5-7B-Instruct")
    assert cli_main(["evaluate", "--run", str(own), "--data", "jsonl:m.jsonl", "--out", str(tmp_path / "o")]) == 0
    assert stub_runners[0][1]["model"] == "Qwen/Qwen2.5-7B-Instruct"


def test_cli_train_uses_the_same_run_key_rule_and_fresh(tmp_path, stub_runners):
    sft = write_sft(tmp_path / "run" / "sft", 2)
    assert cli_main(["train", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "t"), "--fresh"]) == 0
    (_, call), = stub_runners
    cfg = load_config(overrides=[f"out={tmp_path / 't'}"])
    assert call == {"dataset": str(sft), "run_key": stages.train_plan(cfg, str(sft), str(tmp_path / "t")).run_key,
                    "fresh": True}


# --- the guard stage ---


def pool_file(tmp_path, rows=None):
    path = tmp_path / "pool.jsonl"
    rows = rows or [{"id": f"p{i}", "source": "pool", "lang": "en", "task": "judge", "category": None,
                     "question": f"Is this safe? text {i}", "options": ["safe", "unsafe"], "answer": i % 2}
                    for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f"jsonl:{path}"


def test_guard_tuning_is_off_by_default_and_the_stages_use_model_name(tmp_path):
    plans = stages.job_plans(config(tmp_path))
    assert "guard" not in plans
    assert plans["pipeline"].inputs["config"]["model.name"] == "embedded"
    assert stages.stage_config(config(tmp_path)).model.name == "embedded"


def test_with_a_guard_pool_every_later_stage_runs_on_the_guard_model(tmp_path, stub_runners):
    seen = {}
    pipeline = stages.RUNNERS["pipeline"]

    def watching_pipeline(cfg):
        seen["model"] = cfg.model.name
        return pipeline(cfg)

    stages.RUNNERS["pipeline"] = watching_pipeline
    guarded = config(tmp_path, f"guard.data={pool_file(tmp_path)}")
    plans = stages.job_plans(guarded)
    guard_print = plans["guard"].fingerprint
    for name in ("pipeline", "train", "evaluate"):
        assert plans[name].inputs["config"]["model.name"] == {"stage": "guard", "fingerprint": guard_print}
        assert plans[name].upstream[0] == "guard"
    report = stages.run_job(guarded, list(stages.STAGES))
    assert ran(stub_runners) == ["guard", "pipeline", "train", "evaluate"]
    assert seen["model"] == str(tmp_path / "run" / "guard" / "merged")
    assert report["guard"]["status"] == "ran"

    # guard settings redo the guard and, through its fingerprint, every stage after it
    stages.run_job(config(tmp_path, f"guard.data={pool_file(tmp_path)}", "guard.learning_rate=1e-3"),
                   list(stages.STAGES))
    assert ran(stub_runners) == ["guard", "pipeline", "train", "evaluate"]
    # SafeConf's own learning rate is not the guard's
    stages.run_job(config(tmp_path, f"guard.data={pool_file(tmp_path)}", "guard.learning_rate=1e-3",
                          "train.learning_rate=1e-3"), list(stages.STAGES))
    assert ran(stub_runners) == ["train", "evaluate"]


def test_safeconf_training_on_the_guard_model_keeps_its_run_key_once_the_merged_model_exists(tmp_path):
    """The train stage's Ray Train run is keyed by the guard stage's fingerprint, not by the merged folder's files:
    planned before the guard ran (no folder) or after (a folder rewritten by every guard redo), an interrupted
    SafeConf training resumes; another guard model starts a new run."""
    guarded = lambda *extra: config(tmp_path, f"guard.data={pool_file(tmp_path)}", *extra)  # noqa: E731
    before = stages.job_plans(guarded())["train"]
    merged = tmp_path / "run" / "guard" / "merged"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"weights")
    after = stages.job_plans(guarded())["train"]
    assert after.run_key == before.run_key and after.fingerprint == before.fingerprint
    assert stages.job_plans(guarded("guard.learning_rate=1e-3"))["train"].run_key != before.run_key


@pytest.mark.parametrize("key", ["guard.epochs=2", "guard.lora_target_modules=[q_proj]", "guard.limit=3",
                                 "guard.val_fraction=0.5", "train.micro_batch_size=8", "model.dtype=float32",
                                 "data=jsonl:/tmp/other.jsonl", "eval.data=jsonl:/tmp/heldout.jsonl"])
def test_what_the_guard_model_depends_on_changes_its_fingerprint(tmp_path, key):
    pool = pool_file(tmp_path)
    before = stages.job_plans(config(tmp_path, f"guard.data={pool}"))["guard"]
    after = stages.job_plans(config(tmp_path, f"guard.data={pool}", key))["guard"]
    assert after.fingerprint != before.fingerprint
    assert after.run_key != before.run_key  # an interrupted guard run never resumes on other inputs


@pytest.mark.parametrize("key", ["train.learning_rate=1e-3", "train.lora_target_modules=[q_proj]", "sampling.k=8",
                                 "train.epochs=3", "train.log_every=1", "engine.concurrency=2"])
def test_what_only_safeconf_reads_leaves_the_guard_model_alone(tmp_path, key):
    pool = pool_file(tmp_path)
    before = stages.job_plans(config(tmp_path, f"guard.data={pool}"))["guard"]
    assert stages.job_plans(config(tmp_path, f"guard.data={pool}", key))["guard"].fingerprint == before.fingerprint


def test_cli_guard_runs_the_guard_stage_on_the_pool_it_names(tmp_path, stub_runners, capsys):
    pool = pool_file(tmp_path)
    assert cli_main(["guard", "--data", pool, "--out", str(tmp_path / "run"), "--fresh"]) == 0
    (name, call), = stub_runners
    expected = stages.guard_plan(config(tmp_path, f"guard.data={pool}"))
    assert name == "guard" and call == {"run_key": expected.run_key, "fresh": True}
    ran(stub_runners)
    with pytest.raises(SystemExit, match="give the pool"):
        cli_main(["guard", "--out", str(tmp_path / "run")])
