"""Escalation of deferred judgements to a stronger judge ("Trust or Escalate", Jung et al., ICLR 2025).

With serve.escalate_url set, a judgement the calibrated threshold defers (and an unreadable one) is sent to an
OpenAI-compatible chat endpoint (vLLM's `vllm serve`, OpenAI, any gateway): serve.escalate_model answers the same
prompt SafeConf's verbalized method asks (render_messages of the question, "Answer: <label>"), read by the same
parser (replies.parse_answer). The bearer key is read in the replica from the variable serve.escalate_key_env
(none sent when it is unset).

Bounded: each attempt waits at most serve.escalate_timeout_s, a connection failure, timeout, 429 or 5xx is
retried serve.escalate_retries times (after 0.1 s, 0.2 s, ...), and nothing runs past the request's own deadline
(serve.request_timeout_s). A target that is down, slow or answers garbage never fails the request: SafeConf's own
answer comes back with tier `uncertain`, `decided_by: "safeconf"` and `escalation_error` saying what went wrong.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass

import aiohttp

from safeconf.prompts import render_messages
from safeconf.replies import parse_answer
from safeconf.serving.judging import JudgeItem, side

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
BACKOFF_S = 0.1
MAX_REPLY_TOKENS = 64  # a verdict line ("Answer: B") and perhaps a confidence: not an essay


class EscalationError(Exception):
    """The stronger judge gave no usable answer; the message goes to the client as escalation_error."""


@dataclass(frozen=True)
class EscalationTarget:
    """Where deferred judgements go (plain data: travels in Serve's user_config; the key never does)."""

    url: str  # the chat completions URL
    model: str
    key_env: str
    timeout_s: float
    retries: int

    @classmethod
    def of(cls, serve_cfg) -> "EscalationTarget | None":
        """From the serve config; None when serve.escalate_url is empty (no escalation)."""
        if not serve_cfg.escalate_url:
            return None
        return cls(chat_url(serve_cfg.escalate_url), serve_cfg.escalate_model, serve_cfg.escalate_key_env,
                   float(serve_cfg.escalate_timeout_s), int(serve_cfg.escalate_retries))

    @classmethod
    def from_dict(cls, values: dict | None) -> "EscalationTarget | None":
        return None if not values else cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def api_key(self) -> str:
        return os.environ.get(self.key_env, "").strip() if self.key_env else ""


def chat_url(base: str) -> str:
    """An OpenAI base URL (http://host:8000/v1, as clients take it) or the full chat completions URL."""
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else base + "/chat/completions"


def escalation_body(target: EscalationTarget, item: JudgeItem) -> dict:
    return {"model": target.model, "messages": render_messages(item.variant()), "temperature": 0,
            "max_tokens": MAX_REPLY_TOKENS}


def read_verdict(item: JudgeItem, payload) -> dict:
    """The stronger judge's answer from a chat completion body; EscalationError when it names no option."""
    try:
        reply = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EscalationError("reply is not a chat completion (no choices[0].message.content)") from None
    if not isinstance(reply, str):
        raise EscalationError("reply content is not text")
    variant = item.variant()
    choice = parse_answer(reply, item.options, variant["labels"]).choice
    if choice is None:
        raise EscalationError(f"reply names no option: {reply[:200]!r}")
    return {"answer_index": choice, "answer_label": variant["labels"][choice], "answer_text": item.options[choice],
            "label": side(choice, item.unsafe_option), "reply": reply}


async def escalate(session: aiohttp.ClientSession, target: EscalationTarget, item: JudgeItem,
                   deadline: float) -> dict:
    """The stronger judge's verdict on the item, with `model`, `attempts` and `seconds`; EscalationError when
    every attempt failed, or `deadline` (time.monotonic()) came first."""
    headers = {"Authorization": f"Bearer {target.api_key()}"} if target.api_key() else {}
    body = escalation_body(target, item)
    started, problem = time.monotonic(), "no attempt made"
    for attempt in range(1, target.retries + 2):
        left = deadline - time.monotonic()
        if left <= 0:
            problem = f"{problem}; out of time (serve.request_timeout_s)"
            break
        try:
            timeout = aiohttp.ClientTimeout(total=min(target.timeout_s, left))
            async with session.post(target.url, json=body, headers=headers, timeout=timeout) as response:
                text = await response.text()
                status = response.status
        except (asyncio.TimeoutError, TimeoutError):
            problem = f"no answer within {min(target.timeout_s, left):.3g} s"
        except aiohttp.ClientError as e:
            problem = f"{type(e).__name__}: {e}"
        else:
            if status == 200:
                try:
                    payload = json.loads(text)
                except ValueError:
                    raise EscalationError(f"reply is not JSON: {text[:200]!r}") from None
                verdict = read_verdict(item, payload)
                return {**verdict, "model": target.model, "attempts": attempt,
                        "seconds": round(time.monotonic() - started, 3)}
            problem = f"HTTP {status}: {text[:200]}"
            if status not in RETRY_STATUSES:  # a wrong key or model: asking again will not help
                raise EscalationError(f"{problem} (not retried)")
        if attempt <= target.retries:
            await asyncio.sleep(min(BACKOFF_S * 2 ** (attempt - 1), max(deadline - time.monotonic(), 0)))
    raise EscalationError(f"{target.url}: {problem} (after {attempt} attempt{'s' if attempt > 1 else ''})")


def with_escalation(answer: dict, verdict: dict | None = None, error: str | None = None) -> dict:
    """A deferred answer after escalation: the stronger judge's verdict decides `label` and `tier` (its answer
    under `escalation`; SafeConf's answer, confidence and p_unsafe stay as they were), or, on failure, SafeConf's
    answer stays, tier `uncertain`, with `escalation_error`."""
    if verdict is None:
        return {**answer, "decided_by": "safeconf", "escalation_error": error}
    has_sides = answer["unsafe_option"] is not None
    return {**answer, "decided_by": "escalated", "label": verdict["label"],
            "tier": verdict["label"] if has_sides else None, "escalation": verdict, "escalation_error": None}
