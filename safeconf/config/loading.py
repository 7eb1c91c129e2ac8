"""The root Config and how it loads: defaults <- YAML file <- key=value overrides <- explicit values, merged into one
nested dict (unknown keys refused, override text coerced to each field's type), then validated once by pydantic, so
a rule across keys sees the final values and every problem is reported at once."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Literal

import pydantic
import yaml
from pydantic.dataclasses import dataclass

from safeconf.config.eval_serve import EvalConfig, ServeConfig
from safeconf.config.options import Section, option, section
from safeconf.config.sections import (EngineConfig, GuardConfig, ModelConfig, MutationConfig, SamplingConfig,
                                      SFTConfig, TrainConfig)


@dataclass
class Config(Section):
    # read_by: the stages whose fingerprints read the key or section (guard: of the config it trains with,
    # safeconf.guard.guard_train_config; its pool is an input of its own); serving runs no stage
    data: str = option("embedded", "Questions SPEC: a path, format:path (jsonl, parquet, json, safetybench, xstest, xstest-completions, diasafety, cold, hf, mmlu, cmmlu) or 'embedded'.",
                       spec="data", read_by=("pipeline",))
    out: str = option("runs/latest", "Output directory (local path, s3:// or gs://).")
    limit: int = option(0, "Read at most this many rows (0 = all).", read_by=("pipeline", "evaluate"))
    ray_address: str = option("", "Ray cluster address; empty starts or joins a local Ray.")
    model: ModelConfig = section(ModelConfig, read_by=("guard", "pipeline", "train", "evaluate"))
    engine: EngineConfig = section(EngineConfig, read_by=("pipeline", "evaluate"))
    mutation: MutationConfig = section(MutationConfig, read_by=("pipeline", "evaluate"))
    sampling: SamplingConfig = section(SamplingConfig, read_by=("pipeline", "evaluate"))
    guard: GuardConfig = section(GuardConfig, read_by=())
    sft: SFTConfig = section(SFTConfig, read_by=("pipeline",))
    train: TrainConfig = section(TrainConfig, read_by=("guard", "train"))
    eval: EvalConfig = section(EvalConfig, read_by=("evaluate",))
    serve: ServeConfig = section(ServeConfig, read_by=())

    def validate(self) -> Config:
        """Check the current values as load_config does (callers set fields one by one, then validate); returns
        self, or raises ValueError('invalid config: ...') listing every problem."""
        values: dict = {}
        _merge(values, self.to_dict(), Config)
        _build(values)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CONFIG = pydantic.TypeAdapter(Config)


def field_metadata(name: str, cls=Config, prefix: str = "") -> dict:
    """{dotted key: value} of one metadata entry of option() / section() (e.g. "spec"), wherever it is set, over
    the whole config; a section's own entry is under its name."""
    found = {}
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get(name):
            found[prefix + f.name] = f.metadata[name]
        if dataclasses.is_dataclass(types[f.name]):
            found.update(field_metadata(name, types[f.name], f"{prefix}{f.name}."))
    return found


def describe_options(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every option, for --help."""
    rows = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe_options(type(value), prefix=f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows


def parse_overrides(pairs: list[str]) -> dict:
    """['engine.kind=vllm', 'limit=8'] -> {'engine': {'kind': 'vllm'}, 'limit': '8'}"""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like key=value (e.g. sampling.k=8)")
        key, value = pair.split("=", 1)
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def load_config(path: str | None = None, overrides: list[str] | None = None, **explicit) -> Config:
    """Defaults, then the YAML file, then key=value overrides, then explicit keyword values (None: not given)."""
    values: dict = {}  # what is left out keeps its default
    if path:
        text = Path(path).read_text(encoding="utf-8")
        layer = yaml.safe_load(text) or {}
        if not isinstance(layer, dict):
            raise ValueError(f"{path}: the config file must hold a mapping of keys")
        _merge(values, layer, Config)
    _merge(values, parse_overrides(overrides or []), Config)
    _merge(values, {k: v for k, v in explicit.items() if v is not None}, Config)
    return _build(values)


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. inside a Ray actor)."""
    merged: dict = {}
    _merge(merged, values, Config)
    return _build(merged)


def _merge(into: dict, values: dict, cls, prefix: str = "") -> None:
    """Write one layer of values into the nested dict of section `cls`: an unknown key is refused naming the known
    ones, override text is coerced to the field's type, a value of another type is refused."""
    types = typing.get_type_hints(cls)
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in types:
            raise ValueError(f"unknown config key {name!r}; known keys here: {', '.join(sorted(types))}")
        if dataclasses.is_dataclass(types[key]):
            if not isinstance(value, dict):
                raise ValueError(f"{name} is a section; give its keys, e.g. {name}.<key>=...")
            _merge(into.setdefault(key, {}), value, types[key], prefix=f"{name}.")
        else:
            into[key] = _typed(value, _value_type(types[key]), name)


def _value_type(annotation):
    """The Python type a field's values have: the type of a Literal's choices, list for list[...]."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return type(typing.get_args(annotation)[0])
    return list if origin is list else annotation


def _typed(value, typ, key: str):
    """The value as the field's type: text coerced, an int widened to a float field, any other mismatch refused
    (YAML `true` for a number included)."""
    if isinstance(value, str) and typ is not str:
        return _coerce(value, typ, key)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise ValueError(f"{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}")
    return value


def _coerce(value: str, typ, key: str):
    """Turn the text of a key=value override into the field's type."""
    if typ is bool:
        lowered = value.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if typ in (int, float):
        try:
            return typ(value)
        except ValueError:
            raise ValueError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is list:
        parsed = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(parsed, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return parsed
    return value


def _build(values: dict) -> Config:
    """The validated Config of the merged values, or ValueError('invalid config:' and one line per problem). A value
    outside its field's type hides the rules of its section, so it is set back to its default and the values
    validated again: its section's other problems are reported with it."""
    problems: list[str] = []
    for _ in range(3):
        try:
            config = _CONFIG.validate_python(values)
            break
        except pydantic.ValidationError as error:
            problems += [p for p in _problems(error) if p not in problems]
            mistyped = [e["loc"] for e in error.errors() if e["type"] != "value_error"]
            if not mistyped:
                break
            values = _without(values, mistyped)
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    return config


def _problems(error: pydantic.ValidationError) -> list[str]:
    """One line per problem, each naming its dotted key."""
    found = []
    for e in error.errors():
        key = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in e["loc"]).lstrip(".")
        if e["type"] == "value_error":  # a section's rules, whose lines name their keys
            found += str(e["ctx"]["error"]).splitlines()
        elif e["type"] == "literal_error":
            found.append(f"{key} must be one of {e['ctx']['expected'].replace(' or ', ', ')}, got {e['input']!r}")
        else:
            found.append(f"{key}: {e['msg']}, got {e['input']!r}")
    return found


def _without(values: dict, locations: list[tuple]) -> dict:
    """A copy of the nested values without the fields at these error locations (they fall back to their defaults)."""
    values = copy.deepcopy(values)
    for location in locations:
        node = values
        for part in location:
            if not isinstance(node.get(part), dict):
                node.pop(part, None)
                break
            node = node[part]
    return values
