"""Fine-tuning throughput and memory, every figure from one run of this script.

    .venv/bin/python benchmarks/train_throughput.py --examples 96 --steps 24 --threads 2

1. Throughput, one CPU worker, SmolLM2-135M-Instruct + LoRA, the same SFT examples (embedded questions, prompt ->
   "Answer + Confidence", with the project's system turn) and the same number of optimizer steps of 4 examples:
   - "before": a plain peft + torch AdamW loop with the settings training had before issue 11 (fp32, micro-batches
     in random order padded to their longest example, transformers' `labels` loss over the LM head at every
     position). Before issue 11 Ray Train + DeepSpeed ran below this loop (0.78x in BENCHMARKS.md), so the ratio
     against it understates the speed-up;
   - "plain": the same loop on what training does now (safeconf.train.data's streamed, length-grouped plan,
     left-padded batches and the loss over the target positions' logits; the model in bf16 as DeepSpeed's bf16
     mode computes it, where train.precision=auto picks bf16 (a CPU with native bf16), else fp32);
   - "ray": `run_training` (Ray Train + DeepSpeed ZeRO-2), default settings (bf16 on this CPU), and again with
     train.precision=fp32: the loss curves of the two over the same steps show what bf16 costs in accuracy.
   - with --contend SHARE, "plain" once more while another process keeps one core busy SHARE of the time (10 ms
     periods): the share of a core that Ray's own processes were seen to take beside the Train worker (~0.3),
     to test whether that alone explains the gap between "ray" and "plain".
   tokens = prompt + target tokens (no padding), the same count for every run. "overall" = tokens over the time in
   training steps (Ray: plus its logging reports); model loading and start-up count in neither.
2. Memory, two workers, ZeRO-2 against ZeRO-3: a randomly initialised model of the Qwen2-1.5B shape (28 layers,
   hidden 1536, MLP 8960, 12 heads / 2 KV heads; SmolLM2's 49k vocabulary: 1.4B parameters) built from a config, no
   download, saved in 500 MB shards as published checkpoints are; micro-batch 1, `--memory-steps` steps; the
   high-water mark of each worker's resident memory (VmHWM), model loading included, and each
   worker's resident memory after loading and at the last report (anonymous vs file-backed, with the high-water
   mark so far: which phase sets the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def build_sft(folder: str, examples: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from safeconf.data.loaders import read_questions
    from safeconf.prompts import format_target, labels_for, render_messages
    from safeconf.sft import SFT_SCHEMA

    rows = []
    questions = [r.record for r in read_questions("embedded") if r.record and r.record.get("answer") is not None]
    for i in range(examples):
        q = questions[i % len(questions)]
        labels = labels_for("upper", len(q["options"]))
        variant = {"lang": q["lang"], "question": q["question"], "options": q["options"], "labels": labels,
                   "framing": i % 4}
        target = format_target(q["lang"], labels[q["answer"]], 0.5 + 0.1 * (i % 5))
        rows.append({"question_id": q["id"], "variant_id": f"{q['id']}-{i}", "mutation": "original", "lang": q["lang"],
                     "task": q["task"], "category": q["category"], "target": target, "answer_label": labels[q["answer"]],
                     "confidence": 0.5, "messages": render_messages(variant) + [{"role": "assistant", "content": target}]})
    os.makedirs(folder, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SFT_SCHEMA), f"{folder}/train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:0], schema=SFT_SCHEMA), f"{folder}/val.parquet")
    return folder


def old_collate(examples, positions, pad_token_id: int) -> dict:
    """Training's batches before issue 11: right-padded, labels for transformers' loss over every position."""
    import torch

    seqs = [examples.ids[i] for i in positions]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for j, (seq, i) in enumerate(zip(seqs, positions)):
        n, p = len(seq), int(examples.prompt_tokens[i])
        input_ids[j, :n] = torch.from_numpy(seq)
        attention_mask[j, :n] = 1
        labels[j, p:n] = input_ids[j, p:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def plain_loop(folder: str, config, threads: int, settings: str) -> dict:
    """peft + torch AdamW in this process; settings 'before' (issue 11's starting point) or 'now'."""
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from safeconf.models import resolve_model
    from safeconf.train.data import (Examples, Plan, causal_lm_loss, collate, encode_example, end_of_turn, load_tokenizer,
                                     stream_order)
    from safeconf.train import training_precision
    from safeconf.train.worker import lr_lambda

    torch.set_num_threads(threads)
    train = config.train
    path = resolve_model(config.model.name)
    tokenizer = load_tokenizer(path)
    eot = end_of_turn(tokenizer)
    table = stream_order(pq.read_table(f"{folder}/train.parquet"), train.seed)  # the order the Ray workers read
    encoded = [encode_example(tokenizer, m, eot) for m in table.column("messages").to_pylist()]
    examples = Examples([np.asarray(ids) for ids, _ in encoded], np.array([p for _, p in encoded]), np.arange(len(encoded)))
    now = settings == "now"
    bf16 = now and training_precision(config) == "bf16"  # as Ray Train's worker would run it on this CPU
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    torch.manual_seed(train.seed)
    lora = LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                      target_modules=list(train.lora_target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora, autocast_adapter_dtype=not bf16)  # LoRA in bf16 too, as DeepSpeed's bf16
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train.max_steps, train.warmup_ratio))
    plan = Plan(1, train.micro_batch_size, 1, train.group_window, train.seed)
    rng = np.random.default_rng(train.seed)
    model.train()
    tokens, step, epoch, losses = 0, 0, 0, []
    started = time.perf_counter()
    while step < train.max_steps:
        if now:  # the stream in windows, length-grouped, as the Ray workers read it
            steps = [[start + m for m in s] for w, start in enumerate(range(0, len(examples), plan.window_rows))
                     for s in plan.window_steps(examples.lengths[start:start + plan.window_rows], 0, epoch, w)]
        else:
            order = rng.permutation(len(examples))
            steps = [[order[i:i + train.micro_batch_size]] for i in range(0, len(order), train.micro_batch_size)]
        for (positions,) in steps:
            if now:
                batch = collate(examples, positions, tokenizer.pad_token_id)
                loss, _ = causal_lm_loss(model, batch)
            else:
                batch = old_collate(examples, positions, tokenizer.pad_token_id)
                loss = model(**batch).loss
            loss.backward()
            tokens += int(batch["attention_mask"].sum())
            losses.append(loss.item())
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.gradient_clipping)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == train.max_steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    return {"run": f"plain peft + AdamW loop, {settings}, {'bf16' if bf16 else 'fp32'}", "steps": step, "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), "final_loss": round(losses[-1], 3)}


def cpu_burner(share: float) -> subprocess.Popen:
    """A process that keeps one core busy `share` of every 10 ms: a stand-in for Ray's control plane."""
    busy, idle = 0.01 * share, 0.01 * (1 - share)
    code = ("import time\nwhile True:\n    t = time.perf_counter()\n"
            f"    while time.perf_counter() - t < {busy}: pass\n    time.sleep({idle})")
    return subprocess.Popen([sys.executable, "-c", code])


def contended(run, share: float) -> dict:
    burner = cpu_burner(share)
    try:
        result = run()
    finally:
        burner.kill()
    return result | {"run": result["run"] + f", another process busy {share:.0%} of one core"}


def ray_run(label: str, folder: str, config, out: str) -> dict:
    from safeconf.train import run_training

    started = time.perf_counter()
    summary = run_training(config, folder, out)
    return {"run": label, "precision": summary["precision"], "steps": summary["steps"], "tokens": summary["train_tokens"],
            "tokens_per_s": round(summary["tokens_per_s"], 1),
            "median_step_tokens_per_s": round(summary["median_step_tokens_per_s"], 1),
            "end_to_end_seconds": round(time.perf_counter() - started, 1),
            "train_loss": [[s, round(v, 4)] for s, v in summary["train_loss"]],
            "peak_rss_mb_per_worker": [round(x) for x in summary["peak_rss_mb_per_worker"]],
            "memory_mb_per_worker": summary["memory_mb_per_worker"]}


def random_qwen2(folder: str) -> str:
    """A randomly initialised bf16 model of the Qwen2-1.5B shape with SmolLM2's tokenizer (no download)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from safeconf.models import resolve_model
    from safeconf.train.data import load_tokenizer

    tokenizer = load_tokenizer(resolve_model("embedded"))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="500MB")  # sharded as published checkpoints are (loading is per shard)
    tokenizer.save_pretrained(folder)
    print(f"random Qwen2-1.5B-shaped model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16",
          flush=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of the throughput runs")
    parser.add_argument("--memory-steps", type=int, default=2, help="optimizer steps of the ZeRO-2/3 memory runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop = CPUs of the Ray worker")
    parser.add_argument("--contend", type=float, default=0.0, help="also the plain loop (today's settings) beside a "
                        "process busy this share of one core (e.g. 0.3)")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: throughput, memory")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()

    import ray

    from safeconf.config import load_config

    work = tempfile.mkdtemp(prefix="safeconf-train-bench-")
    folder = build_sft(f"{work}/sft", args.examples)
    common = ["train.max_length=512", "train.lora_dropout=0", "train.checkpoint_every=100000",
              "train.storage_path=" + f"{work}/checkpoints", *args.overrides]
    ray.init(address="local", num_cpus=max(4, args.threads + 2), include_dashboard=False, log_to_driver=False,
             _temp_dir=f"/tmp/rtb{os.getpid()}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{args.examples} examples, SmolLM2-135M-Instruct + LoRA", flush=True)
    results: dict = {}
    if "throughput" not in args.skip:
        def config(*extra):
            return load_config(overrides=common + [
                f"train.max_steps={args.steps}", "train.num_workers=1", f"train.cpus_per_worker={args.threads}",
                f"train.cpu_threads={args.threads}", "train.micro_batch_size=4", "train.log_every=4", *extra])
        runs = {
            "before": lambda: plain_loop(folder, config(), args.threads, "before"),
            "plain": lambda: plain_loop(folder, config(), args.threads, "now"),
            "ray": lambda: ray_run("ray train + deepspeed zero-2, 1 worker", folder, config("train.run_name=t-bf16"),
                                   f"{work}/out-ray"),
            "ray_fp32": lambda: ray_run("the same, train.precision=fp32", folder,
                                        config("train.precision=fp32", "train.run_name=t-fp32"), f"{work}/out-fp32"),
        }
        if args.contend:
            runs["plain_contended"] = lambda: contended(runs["plain"], args.contend)
        for kind, run in runs.items():
            results[kind] = run()
            print(json.dumps(results[kind]), flush=True)
    if "memory" not in args.skip:
        model = random_qwen2(f"{work}/qwen2-1.5b-random")
        for stage in (2, 3):
            config = load_config(overrides=common + [
                f"model.name={model}", f"train.max_steps={args.memory_steps}", "train.num_workers=2",
                "train.cpus_per_worker=1", "train.micro_batch_size=1", f"train.zero_stage={stage}",
                "train.log_every=100000", f"train.run_name=memory-zero{stage}"])
            results[f"zero{stage}"] = ray_run(f"ray train + deepspeed zero-{stage}, 2 workers", folder, config,
                                              f"{work}/out-zero{stage}")
            print(json.dumps(results[f"zero{stage}"]), flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)  # checkpoints, adapters and the random model: GBs

    print("\nratios (same run):")
    if "ray" in results:
        before, plain, ours, fp32 = (results[k]["tokens_per_s"] for k in ("before", "plain", "ray", "ray_fp32"))
        print(f"  speed-up: ray train + deepspeed now {ours} / plain loop before {before} tokens/s = {ours / before:.2f}x "
              "(target >= 2)")
        print(f"  ray train + deepspeed {ours} / plain loop doing the same {plain} tokens/s = {ours / plain:.2f} "
              "(target >= 0.9)")
        print(f"  bf16 {ours} / fp32 {fp32} tokens/s (ray) = {ours / fp32:.2f}x")
        if "plain_contended" in results:
            busy = results["plain_contended"]["tokens_per_s"]
            print(f"  plain loop beside a process busy {args.contend:.0%} of one core {busy} / alone {plain} tokens/s = "
                  f"{busy / plain:.2f} (ray / plain: {ours / plain:.2f})")
        pairs = list(zip(results["ray"]["train_loss"], results["ray_fp32"]["train_loss"]))
        gaps = [abs(a[1] - b[1]) for a, b in pairs]
        print("  loss, bf16 vs fp32 at the same steps: " + ", ".join(f"step {a[0]}: {a[1]:.3f} / {b[1]:.3f}" for a, b in pairs)
              + f"; largest gap {max(gaps):.3f}")
    if "zero3" in results:
        z2, z3 = (max(results[k]["peak_rss_mb_per_worker"]) for k in ("zero2", "zero3"))
        print(f"  memory: zero-3 / zero-2 peak RSS per worker = {z3 / z2:.2f} ({z3} MB vs {z2} MB; target < 1)")
        for phase in ("after_load", "last_report"):
            r2, r3 = ([w[phase]["rss"] for w in results[k]["memory_mb_per_worker"]] for k in ("zero2", "zero3"))
            peaks = ([w[phase]["peak"] for w in results[k]["memory_mb_per_worker"]] for k in ("zero2", "zero3"))
            print(f"  {phase}: resident per worker zero-2 {r2} MB, zero-3 {r3} MB (max ratio {max(r3) / max(r2):.2f}); "
                  f"high-water marks so far zero-2, zero-3: {' '.join(map(str, peaks))}")


if __name__ == "__main__":
    main()
