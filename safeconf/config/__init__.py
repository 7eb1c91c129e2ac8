"""One typed configuration for every stage: pydantic dataclasses, loaded from YAML and `key=value` overrides.

Every field carries its help text, so `safeconf <stage> --help` explains every option; choice keys are Literal
types and each section's rules are validators, so a bad config is refused when it loads, every problem named by
its dotted key. options: option(), the choices, pool_range; sections and eval_serve: the sections; loading: the
root Config, load_config and config_from_dict.
"""

from safeconf.config.eval_serve import EvalConfig, ServeConfig
from safeconf.config.loading import (Config, config_from_dict, describe_options, field_metadata, load_config,
                                     parse_overrides)
from safeconf.config.options import (ALL_LINEAR, ANSWER_FORMATS, CONFIDENCE_FORMATS, CONFIDENCE_SOURCES,
                                     DEFAULT_EVAL_METHODS, EVAL_METHODS, MODEL_DTYPES, MUTATION_OPERATORS, SFT_TARGETS,
                                     option, pool_range)
from safeconf.config.sections import (EngineConfig, GuardConfig, ModelConfig, MutationConfig, SamplingConfig,
                                      SFTConfig, TrainConfig)

__all__ = ["ALL_LINEAR", "ANSWER_FORMATS", "CONFIDENCE_FORMATS", "CONFIDENCE_SOURCES", "DEFAULT_EVAL_METHODS",
           "EVAL_METHODS", "MODEL_DTYPES", "MUTATION_OPERATORS", "SFT_TARGETS", "Config", "EngineConfig", "EvalConfig",
           "GuardConfig", "ModelConfig", "MutationConfig", "SFTConfig", "SamplingConfig", "ServeConfig", "TrainConfig",
           "config_from_dict", "describe_options", "field_metadata", "load_config", "option", "parse_overrides",
           "pool_range"]
