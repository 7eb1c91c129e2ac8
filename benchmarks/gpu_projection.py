"""GPU-hours per 10k questions for the cluster configs, projected from a measured run.

    .venv/bin/python benchmarks/gpu_projection.py RUN_DIR [--questions 10000] [CONFIG.yaml ...]

RUN_DIR is a finished `python jobs/full.py` run (the embedded default). What is measured there, per question:
prompt tokens per variant (the chat template of the run's model over the variants it made), generated tokens per
answer sample and per LLM-mutation call, SFT examples and their tokens, and the wall time of each stage (also
reported as CPU-hours on that machine: the one fully measured row). For each cluster config (default: the 7B/8B ones
in cluster/configs/) the counts are rescaled to the config's variants m, samples k, max_tokens, operators,
include_variants and epochs, and divided by per-GPU throughputs that are ASSUMPTIONS, not measurements (no GPU was
available where this was written):

- decode, vLLM bf16 7-8B, one GPU, large batches: DECODE_PEAK (third-party figures for Llama-3.1-8B on one H100
  reach ~12.5k output tokens/s) and DECODE_LOW (a third of it: short k-sample answers keep batches prefill-heavy);
- prefill: 2 x params FLOPs per token at PREFILL_MFU of H100 bf16 dense peak (989 TFLOP/s);
- LoRA training: 4 x params FLOPs per token (forward + activation gradients; frozen base weights get none) at
  TRAIN_MFU, ZeRO-3 communication and padding included in that figure;
- evaluation: the held-out share (sft.val_fraction) sampled again by the base and the tuned model, as generation.

Token counts come from the embedded model's tokenizer (Qwen and Llama tokenizers give counts of the same order for
English; more for Chinese): a stated approximation. All terms are linear: half the throughput, twice the hours.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import pyarrow.parquet as pq

from safeconf import io
from safeconf.config import config_from_dict, load_config
from safeconf.mutations import LLM_OPERATORS
from safeconf.prompts import render_messages

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["cluster/configs/qwen2.5-7b.yaml", "cluster/configs/llama3-8b.yaml"]
PARAMS = {"Qwen/Qwen2.5-7B-Instruct": 7.6e9, "meta-llama/Meta-Llama-3-8B-Instruct": 8.0e9}
H100_BF16_FLOPS = 989e12
DECODE_PEAK, DECODE_LOW = 12_500, 4_200  # output tokens/s per GPU (assumed, see above)
PREFILL_MFU, TRAIN_MFU = 0.5, 0.3  # assumed


def chat_tokens(tokenizer, messages: list[dict], **kwargs) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def measure(run_dir: str) -> dict:
    """Per-question token counts and stage times of a finished run."""
    from transformers import AutoTokenizer

    from safeconf.models import resolve_model

    config = config_from_dict(io.read_json(io.join(run_dir, "summary.json"))["config"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model.name, config.model.cache_dir))
    rows = pq.read_table(io.join(run_dir, "confidence")).to_pylist()
    prompt_tokens, sample_tokens, llm_tokens, variants = [], [], [], []
    for row in rows:
        variants.append(len(row["variants"]))
        for v in row["variants"]:
            prompt_tokens.append(chat_tokens(tokenizer, render_messages(v), add_generation_prompt=True))
            sample_tokens += [s["num_tokens"] for s in v["samples"]]
            if v["mutation"] in LLM_OPERATORS:  # what the LLM wrote for an accepted rewrite
                llm_tokens.append(len(tokenizer(v["question"] + " " + " ".join(v["options"]))["input_ids"]))
        llm_tokens += [len(tokenizer(d["text"] or "")["input_ids"]) for d in row["dropped"]]
    sft = pq.read_table(io.join(run_dir, "sft", "train.parquet")).to_pylist()
    example_tokens = [chat_tokens(tokenizer, r["messages"]) for r in sft[:500]]
    full_run = io.read_json(io.join(run_dir, "full_run.json"))
    return {
        "questions": len(rows),
        "variants_per_question": statistics.mean(variants),
        "prompt_tokens_per_variant": statistics.mean(prompt_tokens),
        "tokens_per_sample": statistics.mean(sample_tokens),
        "tokens_per_llm_mutation": statistics.mean(llm_tokens) if llm_tokens else 0.0,
        "tokens_per_example": statistics.mean(example_tokens),
        "stage_seconds": full_run["stage_seconds"],
        "config": config,
    }


def project(measured: dict, config_path: str, questions: int) -> dict:
    """GPU-hours of each stage for `questions` questions under one cluster config."""
    config = load_config(str(REPO / config_path), ["data=embedded", "out=/tmp/unused"])
    params = PARAMS.get(config.model.name)
    if params is None:
        raise SystemExit(f"{config_path}: no parameter count for {config.model.name}; add it to PARAMS")
    m, k = config.mutation.variants_per_question, config.sampling.k
    llm_share = sum(op in LLM_OPERATORS for op in config.mutation.operators) / len(config.mutation.operators)
    variants = 1 + m  # the original and m mutations
    decode = questions * (variants * k * min(measured["tokens_per_sample"], config.sampling.max_tokens)
                          + m * llm_share * min(measured["tokens_per_llm_mutation"], config.mutation.llm_max_tokens))
    prefill = questions * (variants + m * llm_share) * measured["prompt_tokens_per_variant"]
    examples = questions * (1 - config.sft.val_fraction) * (variants if config.sft.include_variants else 1)
    train_tokens = examples * measured["tokens_per_example"] * config.train.epochs
    eval_share = 2 * config.sft.val_fraction  # base + tuned model over the held-out questions
    prefill_rate = PREFILL_MFU * H100_BF16_FLOPS / (2 * params)
    train_rate = TRAIN_MFU * H100_BF16_FLOPS / (4 * params)
    hours = {}
    for name, decode_rate in (("peak", DECODE_PEAK), ("low", DECODE_LOW)):
        generation = (decode / decode_rate + prefill / prefill_rate) / 3600
        hours[name] = {"pipeline": generation, "train": train_tokens / train_rate / 3600,
                       "evaluate": generation * eval_share}
        hours[name]["total"] = sum(hours[name].values())
    engine_gpus = config.engine.pool[1] * config.engine.tensor_parallel_size
    for h in hours.values():  # the stages run one after another, each on its own GPUs
        h["wall"] = (h["pipeline"] + h["evaluate"]) / engine_gpus + h["train"] / config.train.num_workers
    return {"config": config_path, "model": config.model.name, "m": m, "k": k, "decode_tokens": decode,
            "prefill_tokens": prefill, "train_tokens": train_tokens, "hours": hours,
            "gpus": f"{engine_gpus} engine / {config.train.num_workers} train GPUs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished jobs/full.py run of the embedded default")
    parser.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS)
    parser.add_argument("--questions", type=int, default=10_000)
    args = parser.parse_args()
    measured = measure(args.run_dir)
    n = args.questions
    scale = n / measured["questions"]
    print(f"measured in {args.run_dir} ({measured['questions']} questions, "
          f"{measured['variants_per_question']:.2f} variants each after garbled rewrites were dropped): "
          f"{measured['prompt_tokens_per_variant']:.0f} prompt tokens per variant, "
          f"{measured['tokens_per_sample']:.1f} tokens per answer sample, "
          f"{measured['tokens_per_llm_mutation']:.1f} per LLM rewrite, {measured['tokens_per_example']:.0f} per SFT example")
    stages = measured["stage_seconds"]
    print(f"\nembedded default, measured: stage wall times {stages} -> per {n} questions on this machine: "
          + ", ".join(f"{s} {sec * scale / 3600:.1f} h" for s, sec in stages.items())
          + f", total {sum(stages.values()) * scale / 3600:.1f} machine-hours\n")
    print("| config | m | k | decode tokens | train tokens | GPU-h pipeline | GPU-h train | GPU-h evaluate | "
          "GPU-h total | wall h (its GPUs) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.configs:
        p = project(measured, path, n)
        peak, low = p["hours"]["peak"], p["hours"]["low"]
        cell = lambda key: f"{peak[key]:.2f}-{low[key]:.2f}"  # noqa: E731
        print(f"| {p['config']} ({p['model']}) | {p['m']} | {p['k']} | {p['decode_tokens'] / 1e6:.1f} M | "
              f"{p['train_tokens'] / 1e6:.1f} M | {cell('pipeline')} | {cell('train')} | {cell('evaluate')} | "
              f"{cell('total')} | {cell('wall')} ({p['gpus']}) |")
    print(f"\nranges: decode at {DECODE_PEAK} - {DECODE_LOW} tokens/s per GPU; prefill at {PREFILL_MFU:.0%} and "
          f"LoRA training at {TRAIN_MFU:.0%} of H100 bf16 peak (assumptions, see the docstring)")


if __name__ == "__main__":
    main()
