"""What the config sections are built from: option() (a field with its help text), the closed sets of values some
keys take (Literal types: pydantic refuses any other value, naming the key and the choices), the Section base whose
validator runs a section's rules, and pool_range."""

from __future__ import annotations

import re
import typing
from dataclasses import field
from typing import Literal

from pydantic import model_validator
from pydantic.dataclasses import dataclass


def option(default, help: str, speed_only: str = "", spec: str = "", not_read_by: tuple[str, ...] = (),
           read_by: tuple[str, ...] = (), run_key: str = "", **kwargs):
    """A config field with its help text, and what the stages' fingerprints (safeconf.fingerprints) take from it:
    `speed_only`: why the key changes only how fast or where a stage runs, not what it writes (it then stays out of
    every fingerprint); `spec`: the key is a SPEC of this kind (data, general, model), identified by the files it
    names; `not_read_by`: stages whose fingerprint leaves it out (it is an input of their own, or unused there);
    `read_by` (top-level keys only): the stages that read it; `run_key` (train keys): "layout" for a key in the
    Ray Train run's key instead of the fingerprint, "output" for one in the fingerprint but not the run's key."""
    metadata = {"help": help, "speed_only": speed_only, "spec": spec, "not_read_by": tuple(not_read_by),
                "read_by": tuple(read_by), "run_key": run_key}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def section(cls, read_by: tuple[str, ...]):
    """A section of the root config, and the stages whose fingerprints read its keys."""
    return field(default_factory=cls, metadata={"read_by": tuple(read_by)})


EngineKind = Literal["auto", "hf", "vllm"]
EngineDevice = Literal["auto", "cuda", "cpu"]
ModelDtype = Literal["auto", "bfloat16", "float16", "float32"]
AnswerFormat = Literal["label", "free"]
SFTTarget = Literal["gold", "majority"]
ConfidenceFormat = Literal["percent", "bucket", "none"]
ConfidenceSource = Literal["all", "original"]
Precision = Literal["auto", "bf16", "fp32", "fp16"]
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
ZeroStage = Literal[2, 3]
ProxyLocation = Literal["EveryNode", "HeadOnly", "Disabled"]
ReplicaEngine = Literal["auto", "async", "batched"]
# The names of safeconf.mutations.OPERATORS, sorted. Written out because mutations depends on the config, not the
# other way round; tests/test_config.py checks that the two agree.
MutationOperator = Literal["framing", "paraphrase", "polarity", "relabel", "shuffle", "translate"]
EvalMethod = Literal["verbalized", "self_consistency", "mutation_consistency", "token_prob", "token_prob_temperature",
                     "token_prob_contextual", "token_prob_batch", "p_true", "safeconf", "adapter_token_prob"]

MODEL_DTYPES = typing.get_args(ModelDtype)
ANSWER_FORMATS = typing.get_args(AnswerFormat)
SFT_TARGETS = typing.get_args(SFTTarget)
CONFIDENCE_FORMATS = typing.get_args(ConfidenceFormat)
CONFIDENCE_SOURCES = typing.get_args(ConfidenceSource)
MUTATION_OPERATORS = typing.get_args(MutationOperator)
EVAL_METHODS = list(typing.get_args(EvalMethod))
# eval.methods by default: every method but adapter_token_prob, which only an adapter trained without confidence
# in its targets (sft.confidence_format=none) needs
DEFAULT_EVAL_METHODS = [m for m in EVAL_METHODS if m != "adapter_token_prob"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Section:
    """A config section. Its rules beyond the field types are problems(); the validator raises them all at once
    (one line each, naming the dotted key) whenever the section is built or validated."""

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable); the field types are checked apart."""
        return []

    @model_validator(mode="after")
    def _check_rules(self):
        found = self.problems()
        if found:
            raise ValueError("\n".join(found))
        return self


def pool_range(concurrency: int | str) -> tuple[int, int]:
    """engine.concurrency as (min, max): 4 -> (4, 4), '1-8' -> (1, 8)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(concurrency))
    if not match:
        raise ValueError(f"engine.concurrency must be a number or MIN-MAX (e.g. 1-8), got {concurrency!r}")
    bounds = (int(match.group(1)), int(match.group(2) or match.group(1)))
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"engine.concurrency must be >= 1, its MIN <= MAX, got {concurrency!r}")
    return bounds
