"""Request and response bodies of the endpoint, and its error shape.

Requests are pydantic models in strict mode (a number is not a string) so bad input gets a 422 naming the field
before it reaches the model. Errors are `{"error": {"type", "message", "param", "code"}}`, the shape OpenAI
clients read. The moderation bodies follow OpenAI's moderation API (POST /v1/moderations), so its clients
(`client.moderations.create(...)`) work unchanged.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHAT_N = 8  # samples per chat request: n x max_tokens bounds the work one request can ask for
# The one category SafeConf judges: it says safe or unsafe, not which kind of harm (no per-category scores).
MODERATION_CATEGORY = "unsafe"


def _check_not_blank(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty")
    return value


class JudgeRequest(BaseModel):
    """One judgement. Strict: a number is not a string, and unknown fields are refused (typos surface)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    question: str | None = Field(None, description="A multiple-choice question (with options).")
    options: list[str] | None = Field(None, min_length=2, description="The options of the question, 2 or more.")
    unsafe_option: int | None = Field(None, ge=0, description="Multiple choice: the index of the option that means "
                                      "unsafe; inferred from options such as Safe / Unsafe when absent.")
    text: str | None = Field(None, description="Content to judge: a text, or a response to `prompt`.")
    prompt: str | None = Field(None, description="A request: alone, is it safe to comply with; with text, what text answers.")
    lang: Literal["en", "zh"] | None = Field(None, description="Language of the prompt to the model; detected when absent.")
    model: str | None = Field(None, description="The served model that judges: an adapter of serve.adapters, or "
                              "the main model when absent.")

    @field_validator("question", "text", "prompt")
    @classmethod
    def _not_blank(cls, value):
        return _check_not_blank(value)

    @field_validator("options")
    @classmethod
    def _options_not_blank(cls, value):
        if value is not None and any(not option.strip() for option in value):
            raise ValueError("options must not be empty strings")
        return value

    @model_validator(mode="after")
    def _one_kind(self):
        mcq = self.question is not None or self.options is not None
        content = self.text is not None or self.prompt is not None
        if mcq and content:
            raise ValueError("give either question + options, or text / prompt to judge, not both")
        if not mcq and not content:
            raise ValueError("give question + options, or text and/or prompt to judge")
        if mcq and (self.question is None or self.options is None):
            raise ValueError("a multiple-choice question needs both question and options")
        if self.unsafe_option is not None and (not mcq or self.unsafe_option >= len(self.options)):
            raise ValueError("unsafe_option must be an index of options (a text / prompt judgement knows its own)")
        return self


class ModerationRequest(BaseModel):
    """OpenAI's moderation request: one text or a list of texts (images are not judged here)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    input: str | list[str] = Field(description="A text, or a list of texts, each judged on its own.")
    model: str | None = Field(None, description="The served model that judges: an adapter of serve.adapters, or "
                              "the main model when absent.")

    @field_validator("input")
    @classmethod
    def _texts(cls, value):
        texts = [value] if isinstance(value, str) else value
        if not texts:
            raise ValueError("give at least one text")
        if any(not text.strip() for text in texts):
            raise ValueError("texts must not be empty")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ModerationResult(BaseModel):
    """One text's result: OpenAI's fields over SafeConf's one category, plus the calibrated judgement."""

    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    # SafeConf's own fields: what /v1/judge answers for the text
    p_unsafe: float | None
    tier: Literal["safe", "unsafe", "uncertain"]
    confidence: float
    decided_by: Literal["safeconf", "escalated"]
    escalation_error: str | None = None


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # clients add fields (name, ...) we do not need
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")  # OpenAI clients send options we do not implement

    model: str | None = None  # an adapter of serve.adapters, or the main model (any name, without adapters)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHAT_N)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | list[str] | None = None
    stream: bool = False

    @field_validator("stream")
    @classmethod
    def _no_stream(cls, value):
        if value:
            raise ValueError("streaming is not supported; send stream=false")
        return value


class ApiError(Exception):
    """A client error with its HTTP status; the message is shown to the client."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(status: int, kind: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message, "param": param, "code": status}}, status_code=status)
