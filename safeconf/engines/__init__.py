"""Inference engines behind one interface (safeconf.engines.base.Engine: n samples, label scores and next-token
log-probs for a batch of chat prompts), and the factory that picks one: vLLM where it is installed, else
transformers. The factory lives here, above the engines, so the interface imports none of them."""

from __future__ import annotations

import importlib.util

from safeconf.config import EngineConfig, ModelConfig
from safeconf.engines.base import Completion, Engine

__all__ = ["Completion", "Engine", "make_engine", "resolve_engine_kind"]


def resolve_engine_kind(kind: str) -> str:
    """'auto' picks vLLM where it is installed, else transformers."""
    if kind == "auto":
        return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    return kind


def make_engine(model: ModelConfig, engine: EngineConfig, seed: int = 0, asynchronous: bool = False,
                lora_slots: int = 0, lora_rank: int = 16) -> Engine:
    """The engine of engine.kind for the model. asynchronous (vLLM only): the async engine of a Serve replica, whose
    callers' requests share the running batch; with lora_slots on a GPU it serves that many LoRA adapters at once
    over one base model (AsyncVLLMEngine.with_adapter)."""
    from safeconf.models import fetch, resolve_model

    path = resolve_model(model.name, model.cache_dir)
    adapter = fetch(model.adapter, model.cache_dir) if model.adapter else ""  # on this node, where it is loaded
    kind = resolve_engine_kind(engine.kind)
    if asynchronous:
        if kind != "vllm":
            raise ValueError(f"the async engine is vLLM's; engine.kind={engine.kind} resolves to {kind}")
        from safeconf.engines.vllm_async import AsyncVLLMEngine

        return AsyncVLLMEngine(path, model.dtype, engine, seed=seed, adapter=adapter, lora_slots=lora_slots,
                               lora_rank=lora_rank)
    if kind == "vllm":
        from safeconf.engines.vllm_engine import VLLMEngine

        return VLLMEngine(path, model.dtype, engine, seed=seed, adapter=adapter)
    from safeconf.engines.hf_engine import HFEngine

    return HFEngine(path, model.dtype, engine, seed=seed, adapter=adapter)
