"""The requests `lockstep serve` takes: OpenAI's request bodies as a strict schema (a field
lockstep does not implement is named in a 400, never ignored), what they ask of a generation
(`Settings`), their prompts (chat messages, or a raw prompt), and errors in OpenAI's shape
(`ApiError`). serve.py answers them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lockstep import infer


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message, "type": self.kind, "param": self.param, "code": self.code
            }
        }  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class StreamOptions(_Strict):
    include_usage: bool | None = None


class Request(_Strict):
    """What both endpoints take; None is the same as leaving a field out."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # cosmetic: accepted, changes nothing (the README lists it)


R = TypeVar("R", bound=Request)


class ChatRequest(Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Request):
    prompt: str | list[str]


@dataclass(frozen=True)
class Settings:
    """How one reply is generated."""

    max_tokens: int | None  # None: the server's default, within the context
    temperature: float  # 0: greedy
    top_p: float
    seed: int | None
    stop: tuple[str, ...]


def parse(kind: type[R], body: Any) -> R:
    """The request, checked; an ApiError (400) naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        request = kind.model_validate(body)
    except ValidationError as e:
        # the deepest error is the most precise one (a union's other members fail shallower)
        raise _field_error(kind, max(e.errors(), key=lambda x: len(_fields(x["loc"])))) from None
    if request.n not in (None, 1):
        why = f"n: lockstep serve answers one choice per request (n=1), got n={request.n}"
        raise ApiError(400, why, "n")
    stops = _stops(request)
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, "stop: give up to 4 non-empty strings", "stop")
    return request


def _field_error(kind: type[Request], error: dict[str, Any]) -> ApiError:
    """A pydantic error as one line naming the field (`messages[0].role`) and the fix."""
    loc = _fields(error["loc"])
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if error["type"] == "extra_forbidden":
        owner = next((p for p in reversed(loc[:-1]) if isinstance(p, str)), None)
        parts = {"messages": ChatMessage, "content": TextPart, "stream_options": StreamOptions}
        known = ", ".join(parts.get(owner, kind).model_fields)
        return ApiError(
            400, f"unsupported field {param!r}: lockstep serve does not implement it; "
            f"supported here: {known}", param,
        )  # fmt: skip
    if error["type"] == "missing":
        return ApiError(400, f"missing required field {param!r}", param)
    got = json.dumps(error.get("input"), default=str)
    got = got if len(got) <= 80 else got[:77] + "..."
    return ApiError(400, f"{param}: {error['msg']} (got {got})", param)


def _fields(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A pydantic error location less the union members it tried (`str`, `list[TextPart]`)."""
    types = ("str", "int", "float", "bool")
    return tuple(p for p in loc if not (isinstance(p, str) and (p in types or "[" in p)))


def settings(request: Request) -> Settings:
    """The generation settings of a checked request (OpenAI's defaults: temperature 1, top_p 1)."""
    asked = request.max_tokens
    if isinstance(request, ChatRequest) and request.max_completion_tokens is not None:
        if asked is not None and asked != request.max_completion_tokens:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        asked = request.max_completion_tokens
    return Settings(
        max_tokens=asked,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=_stops(request),
    )


def _stops(request: Request) -> tuple[str, ...]:
    """`stop` as a tuple of strings (a string alone is one)."""
    return (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())


def messages(request: ChatRequest) -> list[infer.Message]:
    """The conversation as `lockstep chat` hands it to the template: role and text content."""
    return [
        {
            "role": m.role,
            "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
        }
        for m in request.messages
    ]  # fmt: skip


def raw_prompt(request: CompletionRequest) -> str:
    """The one prompt of a completion request (a list of one is the same)."""
    if isinstance(request.prompt, str):
        return request.prompt
    if len(request.prompt) != 1:
        raise ApiError(
            400, f"prompt: one prompt per request (a string, or a list of one), got "
            f"{len(request.prompt)}", "prompt",
        )  # fmt: skip
    return request.prompt[0]
