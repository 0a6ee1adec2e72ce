"""What `qlorakit serve` accepts in a request, checked before anything is queued: each refusal is a 4xx with
one line naming the field and what is allowed, never a dropped connection or an allocation the size of a typo.

  - the body: a Content-Length from 0 to MAX_BODY_BYTES (413 above it, 400 when missing or not a number), then a
    JSON object;
  - chat messages: a non-empty list of {"role": system | user | assistant, "content": text} ending with a user
    message; a completion's prompt: one string;
  - max_tokens (or max_completion_tokens) an integer >= 1, default 16; temperature finite and >= 0, default 0
    (greedy); 0 < top_p <= 1, default 1;
  - the prompt and max_tokens together within the model's context (max_position_embeddings), checked once the
    prompt is tokenized (AdapterServer.check_fits).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt a 4-bit model's context holds
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the server refuses: HTTP status, an OpenAI-style error code, and the one-line message."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.code = status, code


def read_body(headers: Any, rfile: Any, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's JSON object, read from `rfile` after checking its Content-Length against `limit`."""
    raw = headers.get("Content-Length")
    try:
        length = int(raw)
    except (TypeError, ValueError):
        raise RequestError(f"Content-Length {raw!r}: send the body's length in bytes", HTTPStatus.LENGTH_REQUIRED,
                           "length_required") from None
    if length < 0:
        raise RequestError(f"Content-Length {length}: allowed 0 to {limit} bytes")
    if length > limit:
        raise RequestError(f"the body is {length} bytes; this server takes at most {limit}",
                           HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body_too_large")
    try:
        body = json.loads(rfile.read(length) or b"{}")
    except ValueError as err:
        raise RequestError(f"invalid JSON body: {err}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise RequestError("invalid JSON body: the body must be a JSON object", code="invalid_json")
    return body


def prompt_of(body: dict[str, Any], chat: bool) -> tuple[str, list[dict[str, str]] | None]:
    """(the last user text, the earlier messages) of a chat request, or (prompt, None) of a completion request."""
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string (one prompt per request)")
        return prompt, None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] is a {type(m).__name__}; each message is an object "
                               "{\"role\": ..., \"content\": \"...\"}")
        if m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role {m.get('role')!r}: allowed {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string")
    if messages[-1]["role"] != "user":
        raise RequestError("'messages' must end with a user message")
    return messages[-1]["content"], [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]


def sampling_of(body: dict[str, Any]) -> tuple[int, float, float]:
    """(max_tokens, temperature, top_p) of a request (see the module docstring); RequestError naming the field."""
    from .session import check_sampling

    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    values = [body.get(name) for name in (key, "temperature", "top_p")]
    max_tokens, temperature, top_p = (d if v is None else v for v, d in zip(values, (16, 0.0, 1.0)))
    try:
        check_sampling(max_tokens, temperature, top_p, names=(key, "temperature", "top_p"))
    except ValueError as err:
        raise RequestError(str(err)) from None
    return max_tokens, float(temperature), float(top_p)


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
