"""transformers `generate`: the reference engine, and the fallback where vLLM is not installed."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safeconf.config import EngineConfig
from safeconf.engines.base import Completion, Engine, cpu_threads, engine_device
from safeconf.models import engine_dtype

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class HFEngine(Engine):
    def __init__(self, model_path: str, dtype: str, config: EngineConfig, seed: int = 0, adapter: str = ""):
        self.device = engine_device(config)
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(config))
        dtype = engine_dtype(dtype, on_gpu=self.device == "cuda")
        if self.device == "cpu" and dtype == "float16":
            dtype = "float32"  # fp16 matmuls are not supported on CPU
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
        if adapter:
            from peft import PeftModel

            # Merged once at load: inference then costs what the base model costs.
            self.model = PeftModel.from_pretrained(self.model, adapter).merge_and_unload()
        self.model = self.model.to(self.device).eval()
        self.max_prompt_tokens = config.max_prompt_tokens
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.generator_seed = seed

    def prompt_limit(self, max_new_tokens: int) -> int:
        """engine.max_prompt_tokens, and room for the new tokens within the model's context."""
        if self.context_length is None:
            return self.max_prompt_tokens
        return min(self.max_prompt_tokens, self.context_length - max_new_tokens)

    @torch.inference_mode()
    def _next_token_logprobs(self, contexts, targets):
        width = max(len(c) for c in contexts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts], device=self.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts], device=self.device)
        # the last position's logits only: all of them would be (batch x length x vocab), tens of GB at pipeline
        # batch sizes with a 152k vocabulary
        logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return [[logprobs[row, token].item() for token in tokens] for row, tokens in enumerate(targets)]

    @torch.inference_mode()
    def _generate(self, prompts, n, temperature, top_p, max_tokens, stop):
        texts = [self.render(p) for p in prompts]  # already fitted to the context (Engine.generate)
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        torch.manual_seed(self.generator_seed)
        self.generator_seed += 1  # successive batches draw fresh samples, reproducibly
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        output = self.model.generate(
            **encoded,
            **sampling,
            max_new_tokens=max_tokens,
            num_return_sequences=n,
            return_dict_in_generate=True,
            output_logits=True,  # raw logits: log-probs under the model, as vLLM reports them
            pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=stop or None,
            tokenizer=self.tokenizer,  # generate needs it to match stop strings
        )
        generated = output.sequences[:, encoded["input_ids"].shape[1]:]
        # step by step, each step's logits to fp32 alone: no (rows x steps x vocab) fp32 copy
        logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1).gather(-1, generated[:, i, None]).squeeze(-1)
                                for i, step in enumerate(output.logits)], dim=1)
        completions = []
        stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        for row in range(generated.shape[0]):
            ids = generated[row].tolist()
            length = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
            ids = ids[:length]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            for marker in stop or ():
                text = text.split(marker, 1)[0]  # as vLLM does: the stop string is not part of the text
            completions.append(
                Completion(
                    text=text,
                    token_ids=ids,
                    token_logprobs=logprobs[row, :length].tolist(),
                )
            )
        # generate returns the n samples of each prompt next to each other
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]
