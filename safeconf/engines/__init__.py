"""Inference engines behind one interface: generate n samples for a batch of chat prompts."""

from safeconf.engines.base import Completion, Engine, make_engine, resolve_engine_kind

__all__ = ["Completion", "Engine", "make_engine", "resolve_engine_kind"]
