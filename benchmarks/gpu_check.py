"""Device check: label scoring on the device against the CPU, and a LoRA step's memory and speed, at Qwen2-7B's shape.

    python benchmarks/gpu_check.py --json $OUT/gpu_check.json        # on the lent GPU machine (one H200), ~2-3 min
    .venv/bin/python benchmarks/gpu_check.py --device cpu --scale small --layers 2 --seq-len 256   # CPU smoke

It needs torch, transformers and peft only: no Ray, no vLLM, no network, no weights on disk. The model is
Qwen2ForCausalLM from a Qwen2Config of Qwen2-7B's shape (hidden 3584, MLP 18944, 28 heads / 4 KV heads, a
152,064-token vocabulary, untied LM head) with RANDOM weights and --layers layers (default 4) instead of 28: every
"7B" figure below is for that layer-reduced random-weight model, and the 28-layer memory is a linear projection.
--scale small / tiny shrink the width and the vocabulary too (CPU smoke runs and the test).

1. Label scoring through the project's own code (HFEngine.label_scores: chat template, answer prefix, next-token
   log-probs with logits_to_keep=1) on --prompts prompts of the embedded questions (en and zh), in batches of
   --batch-size: once on the device (--dtype, default auto = what the pipeline picks: bf16 on a GPU) and once on
   the CPU in fp32 (the reference), from the same saved bf16 weights. Reported: the largest absolute difference
   of the label log-probs, whether the likeliest label agrees on every prompt, and the seconds per batch of each.
   No Qwen tokenizer is available offline, so a byte-level BPE tokenizer is trained here on the prompts' text
   (ChatML template, as Qwen's); its ids all fall inside the model's vocabulary.
2. A LoRA training step (r=16 on q, k, v, o, gate, up and down projections, the project's alpha and dropout; AdamW
   at the project's learning rate with its gradient clipping; the project's SFT loss over the last --target-tokens
   positions) on --micro-batch x --seq-len random tokens, bf16 on CUDA and fp32 on the CPU, without and with
   gradient checkpointing (non-reentrant), at --layers and at half as many layers. Per run: peak memory
   (torch.cuda.max_memory_allocated; on the CPU the peak RSS), the memory held before a step (weights, LoRA,
   optimizer state), tokens/s over --steps timed steps after --warmup, and the losses (finite; with checkpointing
   the same as without). The per-layer difference between the two layer counts, scaled linearly to 28 layers,
   gives the projected memory of the full model.

Output: a table on stdout; --json PATH writes every figure with the torch, CUDA and transformers versions and the
device's name.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the device machine runs the checkout without installing the package
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; no hub look-ups on a machine without network

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

# Lowest layers of the project that import neither Ray nor vLLM (nor pyarrow): the HF engine and its prompts.
from safeconf.config import ALL_LINEAR, EngineConfig, TrainConfig  # noqa: E402
from safeconf.engines.hf_engine import HFEngine  # noqa: E402
from safeconf.prompts import ANSWER_PREFIX, DEFAULT_STYLE, labels_for, render_messages  # noqa: E402

try:  # the project's SFT loss (LM head on the target positions only); its module imports pyarrow
    from safeconf.train.data import causal_lm_loss

    LOSS_SOURCE = "safeconf.train.data.causal_lm_loss"
except ImportError:  # a device machine without pyarrow: transformers' own labels loss (the same value, full logits)
    LOSS_SOURCE = "transformers labels loss (pyarrow missing: logits of every position, more memory)"

    def causal_lm_loss(model, batch: dict):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], labels=batch["labels"])
        return out.loss, int((batch["labels"][:, 1:] != -100).sum())


FULL_LAYERS = 28
SHAPES = {  # Qwen2-7B, and the same proportions (7 query heads per KV head, MLP 5.3x hidden) shrunk for CPU runs
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
               vocab_size=152064),
    "small": dict(hidden_size=448, intermediate_size=2368, num_attention_heads=7, num_key_value_heads=1,
                  vocab_size=19008),
    "tiny": dict(hidden_size=56, intermediate_size=296, num_attention_heads=7, num_key_value_heads=1,
                 vocab_size=4096),
}
TOKENIZER_VOCAB = 4096  # the trained BPE's size: within every shape's vocabulary
QUESTIONS = REPO / "safeconf" / "data" / "embedded" / "questions.jsonl"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MB = 1024**2


def qwen2_config(scale: str, layers: int, vocab: int | None = None) -> Qwen2Config:
    shape = dict(SHAPES[scale])
    if vocab:
        shape["vocab_size"] = max(shape["vocab_size"], vocab)
    return Qwen2Config(**shape, num_hidden_layers=layers, max_position_embeddings=32768,
                       tie_word_embeddings=False, use_cache=False)


def random_model(config: Qwen2Config, device: str, dtype: torch.dtype, seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)  # the same weights for the same (config, device, seed)
    with torch.device(device):  # initialised where it runs: 2B parameters are slow to draw on a CPU
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


# --- 1. label scoring ---


def scoring_prompts(count: int) -> list[dict]:
    """`count` variants of the embedded questions, en and zh alternating, with the default labels and framing."""
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_lang = [[r for r in rows if r["lang"] == lang] for lang in ("en", "zh")]
    picked = [by_lang[i % 2][i // 2 % len(by_lang[i % 2])] for i in range(count)]
    return [dict(r, labels=labels_for(DEFAULT_STYLE, len(r["options"])), framing=0) for r in picked]


def train_tokenizer(texts: list[str]):
    """A byte-level BPE (Qwen's kind of tokenizer) with ChatML special tokens, trained on `texts` in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def score_all(engine, prompts, prefixes, labels, batch_size: int):
    """(LabelScores per prompt, seconds per batch), batch by batch after one untimed warm-up batch."""
    engine.label_scores(prompts[:batch_size], prefixes[:batch_size], labels[:batch_size])
    scores, times = [], []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        began = time.perf_counter()
        scores += engine.label_scores(prompts[start:end], prefixes[start:end], labels[start:end])
        times.append(time.perf_counter() - began)  # .item() in the engine has synchronised the device
    return scores, times


def check_scoring(args, device: str) -> dict:
    variants = scoring_prompts(args.prompts)
    prompts = [render_messages(v) for v in variants]
    prefixes = [ANSWER_PREFIX[v["lang"]] for v in variants]
    labels = [v["labels"] for v in variants]
    tokenizer = train_tokenizer([m["content"] for p in prompts for m in p] + prefixes + ["A B C D 1 2 3 4"])
    config = qwen2_config(args.scale, args.layers, vocab=len(tokenizer))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        # saved in bf16 and loaded by both engines: the same weights (fp32 on the CPU holds them exactly)
        random_model(config, device, torch.bfloat16, args.seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        gc.collect()
        results = {}
        for name, where, dtype in (("device", device, args.dtype), ("cpu", "cpu", "float32")):
            engine = HFEngine(folder, dtype, EngineConfig(device=where, num_gpus=1 if where == "cuda" else 0))
            scores, times = score_all(engine, prompts, prefixes, labels, args.batch_size)
            results[name] = {"dtype": str(engine.model.dtype).removeprefix("torch."), "scores": scores,
                             "s_per_batch": sum(times) / len(times), "batches": len(times)}
            del engine
            free_memory()
    dev, cpu = results["device"].pop("scores"), results["cpu"].pop("scores")
    diffs = [abs(a - b) for d, c in zip(dev, cpu) for a, b in zip(d.logprobs, c.logprobs)]
    agree = [_argmax(d.logprobs) == _argmax(c.logprobs) for d, c in zip(dev, cpu)]
    return {
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "prompt_tokens_mean": sum(engine_tokens(tokenizer, p) for p in prompts) / len(prompts),
        "whole_label_prompts": sum(s.whole_label for s in cpu),
        "device": results["device"],
        "cpu": results["cpu"],
        "max_abs_logprob_diff": max(diffs),
        "argmax_agree": sum(agree),
        "argmax_agree_all": all(agree),
    }


def engine_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# --- 2. LoRA training step ---


def memory_now(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        # ru_maxrss holds the whole process's peak: writing 5 to clear_refs resets it (Linux), so each run
        # of this process gets its own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # hand freed CPU memory back, so the next run's resident memory starts from what it holds itself
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def sft_batch(args, vocab: int, device: str) -> dict:
    """Random tokens laid out as the project's SFT batches: all positions real, the last --target-tokens of
    each row the target (labels elsewhere -100), so the loss runs the LM head over the target positions only."""
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, -args.target_tokens:] = ids[:, -args.target_tokens:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(args.seq_len).expand_as(ids).contiguous(), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} | {"keep": args.target_tokens + 1}


def lora_run(args, device: str, layers: int, checkpointing: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = qwen2_config(args.scale, layers)
    model = random_model(config, device, dtype, args.seed)
    if checkpointing:  # as safeconf.train.worker.build_model does, plus the input grads peft's docs ask for
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    train = TrainConfig()
    torch.manual_seed(args.seed)  # the same LoRA initialisation in every run
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                                             target_modules=list(ALL_LINEAR), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    batch = sft_batch(args, config.vocab_size, device)
    losses, times, held = [], [], 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # after the warm-up the optimizer state exists: what a step starts from
            sync()
            free_memory()  # on the CPU, the warm-up's freed blocks would count as held in the resident memory
            held = memory_now(device)
            reset_peak(device)
        torch.manual_seed(args.seed + step)  # the same dropout masks with and without checkpointing
        began = time.perf_counter()
        loss, _ = causal_lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - began)
        losses.append(loss.item())
    peak = peak_memory(device)
    timed = sum(times[args.warmup:])
    del model, optimizer, params, batch
    free_memory()
    return {
        "layers": layers,
        "checkpointing": checkpointing,
        "dtype": str(dtype).removeprefix("torch."),
        "held_mb": held / MB,
        "peak_mb": peak / MB,
        "step_mb": (peak - held) / MB,  # activations, gradients and transients of one step
        "tokens_per_s": args.micro_batch * args.seq_len * args.steps / timed,
        "s_per_step": timed / args.steps,
        "losses": losses,
        "loss_finite": all(math.isfinite(x) for x in losses),
    }


def check_training(args, device: str) -> dict:
    counts = sorted({max(1, args.layers // 2), args.layers})
    runs = [lora_run(args, device, layers, ckpt) for layers in counts for ckpt in (False, True)]
    plain, ckpt = runs[0::2], runs[1::2]
    result = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "target_tokens": args.target_tokens,
              "lora_rank": 16, "lora_targets": list(ALL_LINEAR), "loss_fn": LOSS_SOURCE, "runs": runs,
              # same weights, batch and dropout masks: checkpointing must not change the losses
              "loss_diff_checkpointing": max(abs(a - b) for p, c in zip(plain, ckpt)
                                             for a, b in zip(p["losses"], c["losses"]))}
    if len(counts) == 2:
        for key, (low, high) in (("plain", plain), ("checkpointing", ckpt)):
            per_layer = {k: (high[k] - low[k]) / (high["layers"] - low["layers"]) for k in ("held_mb", "step_mb")}
            extra = FULL_LAYERS - high["layers"]
            result[f"projection_{key}"] = {
                "method": f"LINEAR PROJECTION, not a measurement: the {high['layers']}-layer figure + {extra} x the "
                          f"per-layer difference between {low['layers']} and {high['layers']} layers",
                "per_layer_held_mb": per_layer["held_mb"],
                "per_layer_step_mb": per_layer["step_mb"],
                "held_mb": high["held_mb"] + extra * per_layer["held_mb"],
                "step_mb": high["step_mb"] + extra * per_layer["step_mb"],
                "peak_mb": high["peak_mb"] + extra * (per_layer["held_mb"] + per_layer["step_mb"]),
            }
    return result


# --- the report ---


def environment(device: str) -> dict:
    import peft
    import transformers

    if device == "cuda":
        name = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory / MB
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB
    return {"device": device, "device_name": name, "device_memory_mb": total, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}


def print_report(report: dict) -> None:
    env, s, t = report["environment"], report["scoring"], report["training"]
    print(f"\n{env['device_name']} ({env['device']}), torch {env['torch']}, CUDA {env['cuda']}, "
          f"transformers {env['transformers']}, peft {env['peft']}")
    print(f"model: Qwen2 shape '{report['scale']}', {report['layers']} of {FULL_LAYERS} layers, RANDOM weights")
    print(f"\n1. label scoring, {s['prompts']} prompts (mean {s['prompt_tokens_mean']:.0f} tokens) in batches of "
          f"{s['batch_size']}, {s['whole_label_prompts']} scored as whole labels")
    print(f"   {'':8} {'dtype':>9} {'s/batch':>9}")
    for name in ("device", "cpu"):
        print(f"   {name:8} {s[name]['dtype']:>9} {s[name]['s_per_batch']:>9.3f}")
    print(f"   max |logprob diff| {s['max_abs_logprob_diff']:.4g}; likeliest label agrees on "
          f"{s['argmax_agree']}/{s['prompts']} prompts")
    print(f"\n2. LoRA step (r=16, all 7 projections), micro-batch {t['micro_batch']} x {t['seq_len']} tokens, "
          f"loss over the last {t['target_tokens']}")
    print(f"   {'layers':>6} {'ckpt':>5} {'dtype':>9} {'held MB':>9} {'peak MB':>9} {'step MB':>9} {'tok/s':>9} "
          f"{'loss':>8} finite")
    for r in t["runs"]:
        print(f"   {r['layers']:>6} {str(r['checkpointing']):>5} {r['dtype']:>9} {r['held_mb']:>9.0f} "
              f"{r['peak_mb']:>9.0f} {r['step_mb']:>9.0f} {r['tokens_per_s']:>9.0f} {r['losses'][-1]:>8.4f} "
              f"{r['loss_finite']}")
    print(f"   largest loss difference, checkpointing vs plain (same weights, batch, dropout): "
          f"{t['loss_diff_checkpointing']:.3g}")
    for key in ("plain", "checkpointing"):
        p = t.get(f"projection_{key}")
        if p:
            print(f"   {FULL_LAYERS} layers, {key}: held {p['held_mb']:.0f} MB + step {p['step_mb']:.0f} MB = "
                  f"peak {p['peak_mb']:.0f} MB (per layer {p['per_layer_held_mb']:.0f} + "
                  f"{p['per_layer_step_mb']:.0f} MB)")
    if any(k.startswith("projection_") for k in t):
        print(f"   ({FULL_LAYERS}-layer figures are a LINEAR PROJECTION of the measured per-layer difference, "
              "not a measurement)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: cuda if available")
    parser.add_argument("--scale", choices=tuple(SHAPES), default="7b", help="width and vocabulary of the model")
    parser.add_argument("--layers", type=int, default=4, help=f"layers of the model (Qwen2-7B has {FULL_LAYERS})")
    parser.add_argument("--dtype", default="auto", help="device engine's model.dtype (auto: as the pipeline picks)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per label-scoring call")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--target-tokens", type=int, default=16, help="target positions per row (answer + "
                        "confidence are ~16 tokens)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write every figure here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    began = time.perf_counter()
    report = {"scale": args.scale, "layers": args.layers, "shape": SHAPES[args.scale],
              "environment": environment(device)}
    report["scoring"] = check_scoring(args, device)
    report["training"] = check_training(args, device)
    report["seconds"] = time.perf_counter() - began
    print_report(report)
    print(f"\n{report['seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
