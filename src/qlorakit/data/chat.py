"""Conversations rendered through the tokenizer's chat template, with the loss on the assistant turns only.

The template is a black box, so the assistant spans are found by rendering prefixes of the conversation:
for assistant message i, `messages[:i]` with the generation prompt ends exactly where the reply begins, and
`messages[:i + 1]` ends after the template has closed the turn. The reply's span runs from the end of the
first rendering to the last EOS of the second, so it covers the content and the end-of-turn token but neither
the role header before it nor the newline some templates put after the end-of-turn token. This only works when each
rendering is a token prefix of the next; templates that rewrite earlier turns are refused with a clear error.
"""

from __future__ import annotations

from typing import Any

from .pieces import Piece, RecordError, describe, encode, labelled, present_fields

ROLES = ("system", "user", "assistant")


def chat_messages(record: dict[str, Any], field: str) -> list[dict[str, str]]:
    """The record's `field` checked and normalised to [{role, content}], or RecordError."""
    messages = record.get(field)
    if messages is None:
        raise RecordError(f"has no {field!r} field; the chat format needs {field!r}, a list of "
                          f"{{'role', 'content'}} messages; this record has {present_fields(record)}")
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"field {field!r} must be a non-empty list of {{'role', 'content'}} messages, "
                          f"got {describe(messages)}")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError(f"message {j} must be a {{'role', 'content'}} mapping, got {describe(message)}")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            missing = "role" if role is None else "content"
            raise RecordError(f"message {j} has no {missing!r}; it has {present_fields(message)}")
        if role not in ROLES:
            raise RecordError(f"message {j} has role {describe(role)}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RecordError(f"message {j} content must be a string, got {describe(content)}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise RecordError("has no assistant message; the chat format learns from assistant turns")
    if out[0]["role"] == "assistant":
        raise RecordError("starts with an assistant message; a conversation starts with a system or user message "
                          "that the assistant answers")
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """The token ids of `messages` through the tokenizer's chat template (RecordError, one line, if refused)."""
    from jinja2 import TemplateError  # what a template's raise_exception(...) raises

    # The template writes any BOS itself, so the tokenizer adds nothing (as apply_chat_template does).
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise RecordError(f"is refused by the tokenizer's chat template: {reason}") from None
    return encode(tokenizer, text, special=False)


def chat_example(tokenizer: Any, messages: list[dict[str, str]], train_on_inputs: bool) -> Piece:
    """Token ids and labels of a conversation that holds at least one assistant message.

    The example ends right after the last assistant turn (later user turns teach nothing). EOS is appended
    when the template did not close the last assistant turn with it.
    """
    eos = tokenizer.eos_token_id
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    conversation = messages[: last + 1]
    full = render_chat(tokenizer, conversation, generation_prompt=False)
    spans = []
    for i, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        head = render_chat(tokenizer, conversation[:i], generation_prompt=True)
        turn = full if i == last else render_chat(tokenizer, conversation[: i + 1], generation_prompt=False)
        if turn[: len(head)] != head or full[: len(turn)] != turn:
            raise RecordError(f"cannot be masked: the chat template does not render message {i} as a token "
                              "continuation of the messages before it; use the alpaca or text format instead")
        reply = turn[len(head):]
        closers = [k for k, t in enumerate(reply) if t == eos]
        end = len(head) + (closers[-1] + 1 if closers else len(reply))
        spans.append((len(head), end))
    ids = full[: spans[-1][1]]
    if not ids or ids[-1] != eos:
        ids.append(eos)
        spans[-1] = (spans[-1][0], len(ids))
    target = [train_on_inputs] * len(ids)
    for start, end in spans:
        target[start:end] = [True] * (end - start)
    return labelled(ids, target)
