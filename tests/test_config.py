"""Tests of safeconf.config and the `safeconf` command line: defaults, YAML + key=value overrides, their
precedence, the error messages a user sees, and `--help` listing every option.

Nothing here starts Ray or loads a model: the CLI tests either stop at a config error or replace
safeconf.pipeline with a stub.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing

import pytest


from safeconf.cli import build_parser, main
from safeconf.config import (MUTATION_OPERATORS, Config, config_from_dict, describe_options, load_config,
                             parse_overrides)
from safeconf.mutations import OPERATORS
from safeconf.schema import DataFormatError


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "config.yaml"
        path.write_text(text, encoding="utf-8")
        return str(path)

    return write


# --- defaults ------------------------------------------------------------------------------------


def test_defaults_validate():
    config = load_config()
    assert config == Config().validate()
    assert config.sampling.k > 1 and config.sampling.temperature > 0
    assert set(config.mutation.operators) <= set(OPERATORS)


def test_default_lists_are_not_shared_between_configs():
    first, second = Config(), Config()
    first.mutation.operators.append("shuffle")
    first.sampling.stop.append("END")
    assert second.mutation.operators == Config().mutation.operators
    assert second.sampling.stop == ["\n\n"]


# --- overrides -----------------------------------------------------------------------------------


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["engine.kind=vllm", "limit=8", "sampling.stop=a=b"]) == {
        "engine": {"kind": "vllm"},
        "limit": "8",
        "sampling": {"stop": "a=b"},  # only the first '=' splits
    }


def test_overrides_are_coerced_to_each_field_type():
    config = load_config(
        overrides=[
            "sampling.k=8",
            "sampling.temperature=1.2",
            "engine.num_gpus=1",
            "engine.enforce_eager=false",
            "sft.include_variants=no",
            "engine.kind=vllm",
            "limit=50",
            "out=s3://bucket/run",
        ]
    )
    assert config.sampling.k == 8 and type(config.sampling.k) is int
    assert config.sampling.temperature == 1.2
    assert config.engine.num_gpus == 1.0 and type(config.engine.num_gpus) is float
    assert config.engine.enforce_eager is False
    assert config.sft.include_variants is False
    assert config.engine.kind == "vllm"
    assert config.limit == 50
    assert config.out == "s3://bucket/run"


@pytest.mark.parametrize("text", ["true", "True", "1", "yes", "on"])
def test_bool_override_true_spellings(text):
    assert load_config(overrides=[f"engine.enforce_eager={text}"]).engine.enforce_eager is True


@pytest.mark.parametrize("text", ["shuffle,relabel", "[shuffle, relabel]", "[shuffle,relabel]"])
def test_list_override_comma_or_yaml_form(text):
    assert load_config(overrides=[f"mutation.operators={text}"]).mutation.operators == ["shuffle", "relabel"]


def test_empty_list_override():
    assert load_config(overrides=["sampling.stop=[]"]).sampling.stop == []


def test_later_override_wins():
    assert load_config(overrides=["sampling.k=8", "sampling.k=3"]).sampling.k == 3


# --- YAML and precedence -------------------------------------------------------------------------


def test_yaml_file_sets_nested_values(yaml_file):
    path = yaml_file(
        "limit: 20\n"
        "engine:\n  kind: hf\n  num_gpus: 1\n"
        "mutation:\n  operators: [shuffle, framing]\n"
        "sampling:\n  k: 6\n  temperature: 0.9\n"
    )
    config = load_config(path)
    assert config.limit == 20
    assert config.engine.kind == "hf"
    assert config.engine.num_gpus == 1.0
    assert config.mutation.operators == ["shuffle", "framing"]
    assert (config.sampling.k, config.sampling.temperature) == (6, 0.9)
    # keys the file leaves out keep their defaults
    assert config.sampling.top_p == Config().sampling.top_p
    assert config.engine.batch_size == Config().engine.batch_size


def test_empty_yaml_file_gives_defaults(yaml_file):
    assert load_config(yaml_file("")) == Config()


def test_precedence_explicit_over_overrides_over_yaml_over_defaults(yaml_file):
    path = yaml_file("limit: 10\nout: from-yaml\ndata: jsonl:yaml.jsonl\nsampling:\n  k: 6\n  top_p: 0.5\n")
    config = load_config(path, ["limit=20", "out=from-override", "sampling.k=7"], limit=30, data=None)
    assert config.limit == 30  # explicit keyword beats override and YAML
    assert config.out == "from-override"  # override beats YAML
    assert config.sampling.k == 7
    assert config.data == "jsonl:yaml.jsonl"  # explicit None means "not given": YAML stays
    assert config.sampling.top_p == 0.5  # YAML beats default
    assert config.sampling.max_tokens == Config().sampling.max_tokens  # default


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["sampling.kk", "bogus", "engine.kinds"])
def test_unknown_key_error_names_it(key):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        load_config(overrides=[f"{key}=1"])


def test_unknown_key_in_yaml_names_it(yaml_file):
    with pytest.raises(ValueError, match="unknown config key 'sampling.temprature'"):
        load_config(yaml_file("sampling:\n  temprature: 0.5\n"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.k=abc", "sampling.k: expected int, got 'abc'"),
        ("sampling.k=8.5", "sampling.k: expected int"),
        ("sampling.temperature=warm", "sampling.temperature: expected float"),
        ("engine.enforce_eager=maybe", "engine.enforce_eager: expected true/false"),
        ("sampling=3", "sampling is a section"),
    ],
)
def test_bad_type_error_names_key_and_value(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_config(overrides=[override])


def test_bad_type_in_yaml(yaml_file):
    with pytest.raises(ValueError, match=r"sampling\.k: expected int"):
        load_config(yaml_file("sampling:\n  k: [1, 2]\n"))


def test_yaml_file_must_be_a_mapping(yaml_file):
    with pytest.raises(ValueError, match="mapping"):
        load_config(yaml_file("- sampling.k=8\n"))


def test_unknown_operator_is_named_with_the_known_ones():
    with pytest.raises(ValueError) as error:
        load_config(overrides=["mutation.operators=shuffle,sideways"])
    message = str(error.value)
    assert "mutation.operators" in message and "sideways" in message
    assert all(name in message for name in OPERATORS)


def test_override_without_equals_sign():
    with pytest.raises(ValueError, match=r"'sampling\.k' must look like key=value"):
        load_config(overrides=["sampling.k"])


def test_temperature_zero_needs_k_one():
    with pytest.raises(ValueError, match=r"sampling\.temperature must be > 0 when k > 1"):
        load_config(overrides=["sampling.temperature=0"])
    config = load_config(overrides=["sampling.temperature=0", "sampling.k=1"])  # greedy, one sample: fine
    assert (config.sampling.temperature, config.sampling.k) == (0.0, 1)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as error:
        load_config(overrides=["engine.kind=tpu", "sft.target=silver", "sft.val_fraction=1"])
    message = str(error.value)
    assert "engine.kind" in message and "sft.target" in message and "sft.val_fraction" in message


def test_yaml_bool_for_int_key_is_rejected(yaml_file):
    with pytest.raises(ValueError, match=r"sampling\.k: expected int"):
        load_config(yaml_file("sampling:\n  k: true\n"))


# --- to_dict / config_from_dict ------------------------------------------------------------------


def test_config_from_dict_round_trip():
    config = load_config(
        overrides=["sampling.k=8", "engine.num_gpus=0.5", "mutation.operators=[relabel]", "sft.confidence_format=bucket"]
    )
    rebuilt = config_from_dict(config.to_dict())
    assert rebuilt == config
    assert rebuilt.to_dict() == config.to_dict()


def test_config_from_dict_checks_keys():
    with pytest.raises(ValueError, match="unknown config key 'sampling.n'"):
        config_from_dict({"sampling": {"n": 4}})


# --- command line --------------------------------------------------------------------------------


def test_pipeline_help_lists_every_option_with_its_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["pipeline", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    rows = describe_options()
    keys = {key for key, _, _ in rows}
    assert {"sampling.k", "engine.kind", "mutation.operators", "sft.confidence_format", "limit"} <= keys
    for key, default, help_text in rows:
        assert help_text, f"{key} has no help text"
        assert f"  {key} (default {default})" in out
        assert help_text in out


def test_describe_options_matches_the_config_fields():
    flat = {}

    def walk(values, prefix=""):
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(Config().to_dict())
    rows = describe_options()
    assert [key for key, _, _ in rows] == list(flat)
    assert all(default == repr(flat[key]) for key, default, _ in rows)


def test_main_bad_override_exits_2_naming_the_key(capsys):
    assert main(["pipeline", "sampling.kk=8"]) == 2
    err = capsys.readouterr().err
    assert "safeconf pipeline:" in err and "sampling.kk" in err


def test_main_bad_value_exits_2(capsys):
    assert main(["pipeline", "sampling.k=abc"]) == 2
    assert "sampling.k: expected int, got 'abc'" in capsys.readouterr().err


def test_main_missing_config_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["pipeline", "--config", str(missing)]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_main_needs_a_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "pipeline" in capsys.readouterr().err


@pytest.fixture
def stub_pipeline(monkeypatch):
    """Replace safeconf.pipeline (which would start Ray) with a stub that records the config."""
    calls = []
    module = types.ModuleType("safeconf.pipeline")

    def run_pipeline(config):
        calls.append(config)
        if config.data == "broken":
            raise DataFormatError("row 3: options must be a list")
        return {"questions": 2, "config": config.to_dict()}

    module.run_pipeline = run_pipeline
    monkeypatch.setitem(sys.modules, "safeconf.pipeline", module)
    return calls


def test_main_flags_beat_overrides_beat_yaml(stub_pipeline, yaml_file, capsys):
    path = yaml_file("limit: 10\nout: yaml-out\nsampling:\n  k: 6\n")
    code = main(["pipeline", "--config", path, "--limit", "3", "limit=5", "out=override-out", "sampling.k=2"])
    assert code == 0
    (config,) = stub_pipeline
    assert (config.limit, config.out, config.sampling.k) == (3, "override-out", 2)
    out = capsys.readouterr().out
    assert '"questions": 2' in out and '"config"' not in out
    assert "outputs in override-out" in out


def test_main_pipeline_data_error_exits_1(stub_pipeline, capsys):
    assert main(["pipeline", "--data", "broken"]) == 1
    assert "row 3: options must be a list" in capsys.readouterr().err


def test_placement_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="train.placement_strategy must be one of 'PACK', 'SPREAD', 'STRICT_PACK', "
                                         "'STRICT_SPREAD', got 'spread'"):
        load_config(overrides=["train.placement_strategy=spread"])
    assert load_config(overrides=["train.placement_strategy=STRICT_SPREAD"]).train.placement_strategy == "STRICT_SPREAD"
    # serve settings are checked when the config loads, as every section's
    with pytest.raises(ValueError, match="serve.proxy_location must be one of 'EveryNode', 'HeadOnly', 'Disabled'"):
        load_config(overrides=["serve.proxy_location=everynode"])
    assert load_config(overrides=["serve.proxy_location=HeadOnly"]).serve.problems() == []


def test_engine_concurrency_is_a_count_or_a_range():
    from safeconf.config import load_config

    assert load_config(None, ["engine.concurrency=4"]).engine.pool == (4, 4)
    assert load_config(None, ["engine.concurrency=1-8"]).engine.pool == (1, 8)
    assert load_config(None, engine={"concurrency": 2}).engine.pool == (2, 2)
    for bad in ("0", "8-1", "two", "1-"):
        with pytest.raises(ValueError, match="engine.concurrency"):
            load_config(None, [f"engine.concurrency={bad}"])


# --- the pydantic model: choices, rules, shapes --------------------------------------------------


def test_operator_choices_are_the_mutation_operators():
    assert list(MUTATION_OPERATORS) == sorted(OPERATORS)


def test_choice_error_names_the_key_the_choices_and_the_value():
    with pytest.raises(ValueError) as error:
        load_config(overrides=["engine.kind=tpu", "mutation.operators=shuffle,sideways"])
    assert type(error.value) is ValueError  # pydantic's ValidationError does not leak out
    message = str(error.value)
    assert message.startswith("invalid config:")
    assert "engine.kind must be one of 'auto', 'hf', 'vllm', got 'tpu'" in message
    assert "mutation.operators[1] must be one of" in message and "got 'sideways'" in message


def test_a_bad_choice_does_not_hide_the_other_rules_of_its_section():
    with pytest.raises(ValueError) as error:
        load_config(overrides=["train.zero_stage=4", "train.group_window=0", "sampling.k=0"])
    message = str(error.value)
    assert "train.zero_stage must be one of 2, 3, got 4" in message
    assert "train.group_window must be at least 1" in message and "sampling.k must be >= 1" in message


def test_offload_params_needs_zero3():
    with pytest.raises(ValueError, match=r"train\.offload_params needs train\.zero_stage=3"):
        load_config(overrides=["train.offload_params=true"])
    assert load_config(overrides=["train.offload_params=true", "train.zero_stage=3"]).train.offload_params


def test_rules_across_keys_see_the_final_values(yaml_file):
    # min 5 > max 2 after the override, but the explicit value raises max after it: only the merged values count
    path = yaml_file("serve:\n  max_replicas: 2\n")
    config = load_config(path, ["serve.min_replicas=5"], serve={"max_replicas": 6})
    assert (config.serve.min_replicas, config.serve.max_replicas) == (5, 6)
    with pytest.raises(ValueError, match=r"serve\.min_replicas must be >= 1 and <= serve\.max_replicas"):
        load_config(overrides=["serve.max_replicas=4", "serve.min_replicas=5"])


def test_validate_checks_fields_set_after_loading():
    config = load_config()
    config.guard.data = "jsonl:pool.jsonl"
    assert config.validate() is config
    config.sampling.temperature = 0.0
    config.eval.methods = ["verbalized", "bogus"]
    with pytest.raises(ValueError) as error:
        config.validate()
    message = str(error.value)
    assert message.startswith("invalid config:") and "sampling.temperature must be > 0 when k > 1" in message
    assert "eval.methods[1] must be one of" in message


def test_to_dict_keeps_each_fields_type():
    """Stage fingerprints hash to_dict(): a float field must stay a float (1.0, not 1), a list a list, and the
    keys keep the fields' order, also when the values come from text overrides or a dict of another run."""

    def expected_type(annotation):
        origin = typing.get_origin(annotation)
        if origin is typing.Literal:
            return type(typing.get_args(annotation)[0])
        if origin in (types.UnionType, typing.Union):
            return typing.get_args(annotation)
        return list if origin is list else annotation

    def check(values: dict, cls):
        hints = typing.get_type_hints(cls)
        assert list(values) == [f.name for f in dataclasses.fields(cls)]
        for key, value in values.items():
            if dataclasses.is_dataclass(hints[key]):
                check(value, hints[key])
            else:
                allowed = expected_type(hints[key])
                assert type(value) in (allowed if isinstance(allowed, tuple) else (allowed,)), (key, value)

    overrides = ["engine.num_gpus=1", "engine.memory_gib=2", "train.learning_rate=1", "eval.alpha=0.2",
                 "engine.concurrency=1-4", "train.snapshot_steps=[10,20]", "mutation.operators=shuffle"]
    for config in (Config(), load_config(), load_config(overrides=overrides)):
        check(config.to_dict(), Config)
        check(config_from_dict(json.loads(json.dumps(config.to_dict()))).to_dict(), Config)
    values = load_config(overrides=overrides).to_dict()
    assert values["engine"]["num_gpus"] == 1.0 and values["engine"]["concurrency"] == "1-4"
    defaults = Config().to_dict()  # a few keys as JSON: a field's annotation changed to int or tuple shows here too
    assert json.dumps([defaults["engine"]["num_gpus"], defaults["train"]["learning_rate"], defaults["engine"]["concurrency"],
                       defaults["eval"]["coverage_levels"], defaults["sampling"]["stop"]]) == \
        '[0.0, 0.0002, 1, [0.5, 0.8], ["\\n\\n"]]'
    assert json.dumps(Config(engine={"num_cpus": 4}).to_dict()) == json.dumps(load_config(overrides=[
        "engine.num_cpus=4"]).to_dict())

