"""Request and response bodies in OpenAI's shapes (pydantic), plus promptcache's extensions.

Requests: :class:`CompletionRequest` (``prompt`` is plain text or PML ``<prompt schema=...>``) and
:class:`ChatCompletionRequest` (``messages``). Extensions accepted in either body: ``use_cache``
(default true) and ``recompute`` (a selective-recompute policy, see docs/recompute.md).
Responses carry OpenAI's ``usage`` with ``prompt_tokens_details.cached_tokens`` filled, and a
``promptcache`` object in it (computed and recomputed tokens, TTFT, queue time, modules used).
Fields OpenAI defines but this server does not implement (``n`` > 1, ``logprobs``, ``echo``,
``suffix``, ``best_of``, ``tools``...) are refused with 400 naming the field, not silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .config import MAX_STOP_CHARS, MAX_STOP_STRINGS


class UnsupportedField(ValueError):
    """A field OpenAI defines that this server does not implement (400 naming ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationFields(BaseModel):
    """What completions and chat share: sampling, streaming and the promptcache extensions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    # promptcache extensions
    use_cache: bool = True
    recompute: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_bounded(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_supported(self) -> None:
        if self.n != 1:
            raise UnsupportedField("n", f"n={self.n} is not supported: one choice per request")
        if self.logprobs not in (None, False, 0):
            raise UnsupportedField("logprobs", "logprobs are not supported")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "stream_options is only allowed with stream=true")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise UnsupportedField("prompt", f"one prompt per request, got a list of {len(self.prompt)}")
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", "best_of is not supported")

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self, index: int) -> str:
        """The message's text; only text parts are accepted (no images, audio...)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise UnsupportedField(f"messages[{index}].content", f"content parts of type {part.type!r} "
                                       "are not supported (text only)")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    tools: list[Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise UnsupportedField("tools", "tools are not supported")

    def chat_messages(self) -> list[dict]:
        """Messages as the engine takes them (``developer`` is OpenAI's newer name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]


# ---------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class PromptcacheUsage(BaseModel):
    """What promptcache adds to ``usage``: where the prompt's tokens came from and how long it took."""

    computed_tokens: int
    recomputed_tokens: int
    ttft_ms: float
    queue_ms: float
    modules: list[str]


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    promptcache: PromptcacheUsage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "promptcache"
    parent: str | None = None  # a LoRA adapter's card: the base model it runs on (omitted for the base)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# OpenAI's finish reasons are "stop", "length" (and tool/content-filter ones): the scheduler's
# other endings map onto them; the exact one stays in the metrics.
FINISH_REASONS = {"stop": "stop", "length": "length", "window": "length", "deadline": "length",
                  "cancelled": "stop"}


def finish_reason(reason: str | None) -> str | None:
    return FINISH_REASONS.get(reason, reason) if reason is not None else None
