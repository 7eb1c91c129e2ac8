"""Fine-tuning throughput and memory: Ray Train + DeepSpeed against a plain single-process peft + torch AdamW loop,
and peak memory per worker under ZeRO-2 and ZeRO-3. All figures come from one run.

    .venv/bin/python benchmarks/train_throughput.py --examples 48 --steps 12 --threads 2 --repeats 2

1. Throughput, one CPU worker: the same SFT examples (the embedded questions, prompt -> "Answer + Confidence"),
   the same model (SmolLM2-135M-Instruct + LoRA, fp32), micro-batches of 4 in the same order (safeconf.train's epoch
   plan and collate), the same optimizer steps. The plain loop runs in this process with `--threads` torch threads;
   the Ray Train worker gets `--threads` CPUs. tokens = prompt + target tokens (no padding). "overall" = tokens over
   the time in training steps (Ray: plus its logging reports); "median step" = the median of per-step tokens/s,
   which a machine busy with other work now and then disturbs less. Model loading and start-up count in neither;
   the Ray run's end-to-end wall time is printed beside it. The pair runs `--repeats` times, order alternated;
   the ratio compares the best of each.
2. Memory, two workers (ZeRO-2, then ZeRO-3, micro-batch `--memory-micro-batch`): the high-water mark of each
   worker's resident memory (getrusage ru_maxrss), model loading included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time


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


def plain_loop(folder: str, config, threads: int) -> dict:
    """peft + torch AdamW in this process, on the same micro-batches as the Ray worker."""
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from safeconf.models import resolve_model
    from safeconf.train import Examples, collate, encode_example, end_of_turn, epoch_plan, load_tokenizer, lr_lambda

    torch.set_num_threads(threads)
    train = config.train
    path = resolve_model(config.model.name)
    tokenizer = load_tokenizer(path)
    eot = end_of_turn(tokenizer)
    import numpy as np

    encoded = [encode_example(tokenizer, m, eot) for m in pq.read_table(f"{folder}/train.parquet").column("messages").to_pylist()]
    examples = Examples([np.asarray(ids) for ids, _ in encoded], np.array([p for _, p in encoded]), np.arange(len(encoded)))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(train.seed)
    model = get_peft_model(model, LoraConfig(r=train.lora_rank, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                                             target_modules=list(train.lora_target_modules), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train.max_steps, train.warmup_ratio))
    model.train()
    tokens, step, epoch, losses, rates = 0, 0, 0, [], []
    started = time.perf_counter()
    while step < train.max_steps:
        for micro_batches in epoch_plan(len(examples), 1, 0, train.micro_batch_size, train.gradient_accumulation,
                                        train.seed, epoch):
            step_started, step_tokens = time.perf_counter(), tokens
            for positions in micro_batches:
                batch = collate(examples, positions, tokenizer.pad_token_id)
                loss = model(**batch).loss / train.gradient_accumulation
                loss.backward()
                tokens += int(batch["attention_mask"].sum())
                losses.append(loss.item() * train.gradient_accumulation)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.gradient_clipping)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rates.append((tokens - step_tokens) / (time.perf_counter() - step_started))
            step += 1
            if step == train.max_steps:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    return {"run": "plain peft + AdamW loop", "steps": step, "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds, 1), "median_step_tokens_per_s": round(float(np.median(rates)), 1),
            "final_loss": round(losses[-1], 3)}


def ray_run(label: str, folder: str, config, out: str) -> dict:
    from safeconf.train import run_training

    started = time.perf_counter()
    summary = run_training(config, folder, out)
    return {"run": label, "steps": summary["steps"], "tokens": summary["train_tokens"],
            "tokens_per_s": round(summary["tokens_per_s"], 1),
            "median_step_tokens_per_s": round(summary["median_step_tokens_per_s"], 1),
            "end_to_end_seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(summary["final_train_loss"], 3),
            "peak_rss_mb_per_worker": [round(x) for x in summary["peak_rss_mb_per_worker"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the throughput runs")
    parser.add_argument("--memory-steps", type=int, default=4, help="optimizer steps of the ZeRO-2/3 memory runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the plain loop = CPUs of the Ray worker")
    parser.add_argument("--repeats", type=int, default=2, help="throughput pairs (plain loop, ray run), order alternated")
    parser.add_argument("--memory-micro-batch", type=int, default=1,
                        help="micro-batch of the memory runs (small, so parameters weigh more than activations)")
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
             _temp_dir=f"{work}/ray")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.examples} examples, SmolLM2-135M-Instruct + LoRA (fp32)", flush=True)
    results: dict = {"plain": [], "ray": []}
    if "throughput" not in args.skip:
        for repeat in range(args.repeats):  # alternate the order: the machine may be busier at one time than another
            config = load_config(overrides=common + [
                f"train.max_steps={args.steps}", "train.num_workers=1", f"train.cpus_per_worker={args.threads}",
                f"train.cpu_threads={args.threads}",
                "train.micro_batch_size=4", "train.log_every=5", f"train.run_name=throughput-{repeat}"])
            runs = [("plain", lambda: plain_loop(folder, config, args.threads)),
                    ("ray", lambda: ray_run("ray train + deepspeed zero-2, 1 worker", folder, config,
                                            f"{work}/out-ray-{repeat}"))]
            for kind, run in runs if repeat % 2 == 0 else runs[::-1]:
                results[kind].append(run())
                print(json.dumps(results[kind][-1]), flush=True)
    if "memory" not in args.skip:
        for stage in (2, 3):
            config = load_config(overrides=common + [
                f"train.max_steps={args.memory_steps}", "train.num_workers=2", "train.cpus_per_worker=1",
                f"train.micro_batch_size={args.memory_micro_batch}", f"train.zero_stage={stage}",
                "train.log_every=100000", f"train.run_name=memory-zero{stage}"])
            results[f"zero{stage}"] = ray_run(f"ray train + deepspeed zero-{stage}, 2 workers", folder, config,
                                              f"{work}/out-zero{stage}")
            print(json.dumps(results[f"zero{stage}"]), flush=True)
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and adapters of the runs: hundreds of MB

    print("\nratios (same run):")
    if results["ray"]:
        for key, name in (("tokens_per_s", "overall"), ("median_step_tokens_per_s", "median step")):
            plain, ours = (max(r[key] for r in results[k]) for k in ("plain", "ray"))
            print(f"  throughput ({name}, best of {args.repeats}): ray train + deepspeed {ours} / plain loop {plain} "
                  f"tokens/s = {ours / plain:.2f} (target >= 0.8)")
    if "zero3" in results:
        z2, z3 = (max(results[k]["peak_rss_mb_per_worker"]) for k in ("zero2", "zero3"))
        print(f"  memory: zero-3 / zero-2 peak RSS per worker = {z3 / z2:.2f} ({z3} MB vs {z2} MB; target < 1)")

if __name__ == "__main__":
    main()
