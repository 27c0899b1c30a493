"""The OpenAI chat-completions wire format: validated request bodies, response bodies, errors.

Requests are parsed strictly: an unknown field, a wrong type or an out-of-range value is a 400
whose message names the field (`messages.0.role: ...`), in OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`, so the official clients raise it as
`BadRequestError` with that message.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_MODEL_ID_CHARS = 256


class ApiError(Exception):
    """A request the server refuses: HTTP status, message, and OpenAI's error type/code/param."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        """OpenAI's error type: invalid_request_error for 4xx, server_error otherwise."""
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        return error_body(self.message, error_type=self.type, code=self.code, param=self.param)


def error_body(message: str, *, error_type: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """One text part of a message's content list (the only part type served)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One message: role and content (a string, or a list of text parts)."""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64, description="Accepted for compatibility; not used.")

    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    """`stream_options`: include_usage adds a last chunk with token counts."""

    include_usage: bool = False


class ChatRequest(_Strict):
    """A `POST /v1/chat/completions` body: the fields this server honours, nothing else."""

    model: str = Field(min_length=1, max_length=MAX_MODEL_ID_CHARS)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer spelling of max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, description="Fixes sampling; the same request and seed give the same answer.")
    n: Literal[1] = Field(1, description="One choice per request.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; not used.")

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens, else max_tokens, else None (= the server's limit)."""
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """The messages as plain {role, content} dicts."""
        return [{"role": message.role, "content": message.text()} for message in self.messages]


def describe_validation_error(error: ValidationError) -> tuple[str, str | None]:
    """(one message naming every bad field, the first bad field) for a 400."""
    problems, first = [], None
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "body"
        first = first or where
        if item["type"] == "extra_forbidden" and len(item["loc"]) == 1:
            problems.append(f"{where}: unsupported field (accepted: {', '.join(ChatRequest.model_fields)})")
        elif item["type"] == "extra_forbidden":
            problems.append(f"{where}: unsupported field")
        else:
            problems.append(f"{where}: {item['msg']}")
    return "invalid request body: " + "; ".join(problems), first


def parse_chat_request(body: bytes) -> ChatRequest:
    """A validated ChatRequest from raw JSON bytes, or ApiError 400 naming each bad field."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as error:
        message, param = describe_validation_error(error)
        raise ApiError(400, message, code="invalid_request_body", param=param) from None


def new_completion_id() -> str:
    """A fresh `chatcmpl-...` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(completion_id: str, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A non-streaming `chat.completion` response."""
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage_body(prompt_tokens, completion_tokens)}


def chunk_body(completion_id: str, model: str, delta: dict[str, str], finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One streaming `chat.completion.chunk`; a usage-only chunk has no choices."""
    choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                            "logprobs": None}]
    body: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def model_body(model_id: str, created: int) -> dict[str, Any]:
    """One entry of `GET /v1/models`."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "character-baker"}
