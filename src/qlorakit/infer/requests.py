"""What `qlorakit serve` accepts in a request, checked before anything is queued: each refusal is a 4xx with
one line naming the field and what is allowed, never a dropped connection or an allocation the size of a typo.

  - the body: a Content-Length from 0 to MAX_BODY_BYTES (413 above it, 411 when missing or not a number, 400
    when negative), checked before the body is read; then a JSON object;
  - `model`: a served name (404 otherwise), checked before the fields below;
  - chat messages: a non-empty list of {"role": system | user | assistant, "content": text} ending with a user
    message; a completion's prompt: one string (or a list holding one);
  - max_tokens (or max_completion_tokens) an integer >= 1, default 16; temperature finite and >= 0, default 0
    (greedy); 0 < top_p <= 1, default 1; null takes the default; other OpenAI fields are ignored;
  - the prompt and max_tokens together within the model's context (max_position_embeddings), checked once the
    prompt is tokenized (check_fits).

ChatRequest and CompletionRequest are the pydantic models; `parse_request` turns pydantic's first complaint into
the one line (REFUSALS), so a client reads the same words whatever the type or range that was wrong.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt a 4-bit model's context holds
ROLES = ("system", "user", "assistant")
DEFAULT_MAX_TOKENS = 16


class RequestError(ValueError):
    """A request the server refuses: HTTP status, an OpenAI-style error code, and the one-line message."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.code = status, code


def content_length(raw: str | None, limit: int = MAX_BODY_BYTES) -> int:
    """The body's length from its Content-Length header `raw` (None: absent), within 0..limit bytes."""
    try:
        length = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise RequestError(f"Content-Length {raw!r}: send the body's length in bytes", HTTPStatus.LENGTH_REQUIRED,
                           "length_required") from None
    if length < 0:
        raise RequestError(f"Content-Length {length}: allowed 0 to {limit} bytes")
    if length > limit:
        raise RequestError(f"the body is {length} bytes; this server takes at most {limit}",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large")
    return length


def json_object(raw: bytes) -> dict[str, Any]:
    """The request body `raw` as a JSON object (an empty body is {})."""
    try:
        body = json.loads(raw or b"{}")
    except ValueError as err:
        raise RequestError(f"invalid JSON body: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("invalid JSON body: the body must be a JSON object", code="invalid_json")
    return body


def _one_prompt(value: Any) -> Any:
    """OpenAI's prompt may be a list of prompts; one request here is one prompt, so a list of one is that one."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


MaxTokens = Annotated[int, Field(ge=1, strict=True)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(strict=True)]


class _Sampling(BaseModel):
    """The fields both routes share; `model` was already matched against the served names."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name; max_tokens wins when both are given
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False, strict=True)] | None = None
    stream: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _max_tokens_wins(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("max_tokens") is not None:
            return {k: v for k, v in data.items() if k != "max_completion_tokens"}
        return data

    @property
    def sampling(self) -> tuple[int, float, float]:
        """(max_tokens, temperature, top_p), defaults filled in: 16 tokens, greedy, no nucleus cut."""
        limit = self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
        return (DEFAULT_MAX_TOKENS if limit is None else limit, 0.0 if self.temperature is None else self.temperature,
                1.0 if self.top_p is None else self.top_p)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Annotated[str, Field(strict=True), BeforeValidator(_one_prompt)]

    def prompt_and_history(self) -> tuple[str, None]:
        return self.prompt, None


class ChatRequest(_Sampling):
    """POST /v1/chat/completions: the last message is the user's turn to answer, the others its history."""

    messages: Annotated[list[Message], Field(min_length=1)]

    @model_validator(mode="after")
    def _ends_with_the_user(self) -> ChatRequest:
        if self.messages[-1].role != "user":
            raise ValueError("'messages' must end with a user message")
        return self

    def prompt_and_history(self) -> tuple[str, list[dict[str, str]]]:
        return self.messages[-1].content, [m.model_dump() for m in self.messages[:-1]]


# Where pydantic's complaint points (list indexes as int) -> the line the client reads. {where} is the field's
# path (messages[0].role), {value!r} what was sent there, {kind} its JSON-decoded Python type; a place missing
# here gets pydantic's own words.
_ALLOWED = "{where} {value!r}: allowed "
REFUSALS: dict[tuple[Any, ...], str] = {
    ("prompt",): "'prompt' must be a string (one prompt per request)",
    ("messages",): "'messages' must be a non-empty list of {{\"role\", \"content\"}} objects",
    ("messages", int): "{where} is a {kind}; each message is an object {{\"role\": ..., \"content\": \"...\"}}",
    ("messages", int, "role"): _ALLOWED + ", ".join(ROLES),
    ("messages", int, "content"): "{where} must be a string",
    ("max_tokens",): _ALLOWED + "an integer >= 1",
    ("max_completion_tokens",): _ALLOWED + "an integer >= 1",
    ("temperature",): _ALLOWED + "a finite number >= 0 (0: greedy)",
    ("top_p",): _ALLOWED + "a number > 0 and <= 1",
    ("stream",): _ALLOWED + "true or false",
    ("model",): _ALLOWED + "a served model name",
}
_FIELD_ORDER = ("prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream")


def _line(error: dict[str, Any]) -> str:
    """The one line for one of pydantic's errors (see REFUSALS)."""
    loc = error["loc"]
    if not loc:  # a model validator's own words
        return str(error.get("ctx", {}).get("error", error["msg"]))
    where = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    value = None if error["type"] == "missing" else error["input"]
    template = REFUSALS.get(tuple(int if isinstance(p, int) else p for p in loc), "{where} {value!r}: {msg}")
    return template.format(where=where, value=value, kind=type(value).__name__, msg=error["msg"])


def parse_request(body: dict[str, Any], chat: bool) -> ChatRequest | CompletionRequest:
    """The request model of `body`; RequestError (400) with one line for the first field that is wrong, fields
    taken in the order prompt/messages, max_tokens, max_completion_tokens, temperature, top_p."""
    model = ChatRequest if chat else CompletionRequest
    try:
        return model.model_validate(body)
    except ValidationError as err:
        errors = err.errors()
        first = min(errors, key=lambda e: _FIELD_ORDER.index(e["loc"][0]) if e["loc"] and e["loc"][0] in
                    _FIELD_ORDER else -1)
        raise RequestError(_line(first)) from None


def check_fits(n_prompt: int, max_tokens: int, context: int | None) -> None:
    """The prompt (n_prompt tokens) and max_tokens new ones within the model's context of `context` tokens."""
    if context is None:
        return
    if n_prompt >= context:
        raise RequestError(f"the prompt is {n_prompt} tokens; the model's context is {context} tokens",
                           code="context_length_exceeded")
    if n_prompt + max_tokens > context:
        raise RequestError(f"max_tokens {max_tokens}: the prompt ({n_prompt} tokens) leaves {context - n_prompt} "
                           f"of the model's {context}-token context", code="context_length_exceeded")
