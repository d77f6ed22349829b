"""Request models for the OpenAI-compatible API. Limits live in `Field(...)`, so FastAPI enforces them and the
OpenAPI schema (which the fuzz test reads) states them.

Sampling conventions: `top_k` 0 = off, `top_p` 1 = off, `temperature` 0 = greedy. `max_completion_tokens`
is the newer OpenAI spelling of `max_tokens`; when both are given the smaller wins.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 64_000
MAX_MESSAGE_PARTS = 64
MAX_PROMPT_CHARS = 256_000
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_CHOICES = 8
MAX_TOKENS_LIMIT = 1_000_000


class TextPart(BaseModel):
    """One element of OpenAI's list-of-parts message content; only text parts are meaningful to this model."""
    type: Literal["text"]
    text: str = Field(max_length=MAX_MESSAGE_CHARS)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[Annotated[str, Field(max_length=MAX_MESSAGE_CHARS)],
                   Annotated[list[TextPart], Field(max_length=MAX_MESSAGE_PARTS)]]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def plain_messages(messages: list[ChatMessage]) -> list[dict]:
    """The {"role", "content"} dicts the tokenizer renders (list-of-parts content joined)."""
    return [{"role": m.role, "content": m.text()} for m in messages]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields /v1/chat/completions and /v1/completions share."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=256, description="ignored: the server serves one model")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1 = off")
    top_k: int = Field(0, ge=0, le=200, description="sample from the k most likely tokens; 0 = off")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Union[str, list[str], None] = Field(None, validate_default=True,
                                              description=f"up to {MAX_STOP_SEQUENCES} stop strings")
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence must be 1 to {MAX_STOP_CHARS} characters")
        return stops

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


def checked_turns(messages: list[ChatMessage]) -> list[ChatMessage]:
    """A conversation the chat template can render: an optional system message, then user and assistant
    alternating, ending with the user."""
    total = sum(len(m.text()) for m in messages)
    if total > MAX_PROMPT_CHARS:
        raise ValueError(f"the messages hold {total} characters; the limit is {MAX_PROMPT_CHARS}")
    turns = messages[1:] if messages[0].role == "system" else messages
    if any(m.role == "system" for m in turns):
        raise ValueError("a system message may only come first")
    if not turns:
        raise ValueError("add a user message after the system message")
    offset = len(messages) - len(turns)
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            raise ValueError(f"turns must alternate user, assistant, user, ...; message {i + offset} "
                             f"is {message.role!r} where {expected!r} was expected")
    if turns[-1].role != "user":
        raise ValueError("the last message must be from the user")
    return messages


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    @field_validator("messages")
    @classmethod
    def check_turns(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        return checked_turns(messages)

    def requested_max_tokens(self) -> int | None:
        given = [v for v in (self.max_tokens, self.max_completion_tokens) if v is not None]
        return min(given) if given else None


class CompletionRequest(SamplingRequest):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class TokenizeRequest(BaseModel):
    """Either `messages` or `prompt`: the token count /v1/chat/completions or /v1/completions would see."""
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS)

    @field_validator("messages")
    @classmethod
    def check_turns(cls, messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
        return None if messages is None else checked_turns(messages)

    @model_validator(mode="after")
    def one_of_messages_or_prompt(self) -> TokenizeRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("send either messages (a chat) or prompt (raw text), not both or neither")
        return self

