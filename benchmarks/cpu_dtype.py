"""bf16 against fp32 for the embedded model's inference on this CPU, in one run: what model.dtype=auto decides.

    .venv/bin/python benchmarks/cpu_dtype.py [--threads 2] [--repeats 3]

The same inputs in both dtypes, transformers on CPU with --threads threads: a forward pass over 8 prompts of 200
tokens (what label scoring and the evaluation's option scoring cost) and greedy generation of 16 tokens for 4
prompts of 100 (what free-form sampling costs). Prints whether the CPU multiplies bf16 natively (AVX512-BF16 or
AMX) and the fp32 / bf16 speed ratio of each: on a CPU without it torch emulates bf16 arithmetic.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="forward passes timed per dtype (after a warm-up)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from safeconf.models import cpu_has_bf16, engine_dtype, resolve_model

    torch.set_num_threads(args.threads)
    path = resolve_model("embedded")
    ids = torch.randint(100, 20000, (8, 200), generator=torch.Generator().manual_seed(0))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; native bf16: "
          f"{cpu_has_bf16()}; model.dtype=auto gives {engine_dtype('auto', on_gpu=False)}; {args.threads} threads")
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.no_grad():
            model(ids[:1, :20])  # warm-up
            began = time.perf_counter()
            for _ in range(args.repeats):
                model(ids)
            forward = (time.perf_counter() - began) / args.repeats
            began = time.perf_counter()
            model.generate(ids[:4, :100], max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
            generate = time.perf_counter() - began
        timings[str(dtype).split(".")[-1]] = (forward, generate)
        print(f"{dtype}: forward 8 x 200 tokens {forward:.2f} s ({ids.numel() / forward:.0f} tokens/s); "
              f"generate 4 x 16 new tokens {generate:.2f} s ({64 / generate:.1f} tokens/s)", flush=True)
    (f32_fwd, f32_gen), (bf_fwd, bf_gen) = timings["float32"], timings["bfloat16"]
    print(f"bf16 time / fp32 time (same run): forward {bf_fwd / f32_fwd:.2f}x, generate {bf_gen / f32_gen:.2f}x")


if __name__ == "__main__":
    main()
