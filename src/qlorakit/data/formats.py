"""Render one record of a given format into token pieces (ids, labels); see pieces.py for the conventions.

alpaca: instruction, optional input, output. Rendered through the tokenizer's chat template (user turn =
    instruction, plus a blank line and the input when there is one; assistant turn = output), or through the
    classic "### Instruction / ### Input / ### Response" prompt. The prompt is tokenised with the tokenizer's
    special tokens (so its BOS, if it adds one) and the response separately without them, so that the mask
    boundary is exact; EOS is appended.
chat: a list of {role, content} messages, see chat.py.
text: the whole text is the target; EOS is appended. A text longer than max_seq_length is split into
    consecutive chunks that overlap by one token, so every token but the first is predicted exactly once
    (a chunk's first token is never predicted, and it is the previous chunk's last target).

A record with nothing to learn (an empty output, text, or every assistant reply empty) renders to no piece.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataFormatError
from .chat import chat_example, chat_messages
from .pieces import Piece, RecordError, describe, encode, labelled, present_fields

FORMATS = ("alpaca", "chat", "text")
TEMPLATES = ("auto", "chat_template", "alpaca")
ALPACA_FIELDS = ("instruction", "input", "output")
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def resolve_template(fmt: str, template: str, tokenizer: Any, source: str) -> str:
    """The template actually used: 'chat_template', 'alpaca', or 'none' (text format).

    'auto' means the chat template when the tokenizer has one, else the alpaca prompt. Raises DataFormatError
    when the choice needs a chat template the tokenizer lacks.
    """
    if fmt not in FORMATS:
        raise DataFormatError(f"{source}: unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    if template not in TEMPLATES:
        raise DataFormatError(f"{source}: unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "text":
        return "none"
    if fmt == "chat":
        if template == "alpaca":
            raise DataFormatError(f"{source}: template 'alpaca' applies to the alpaca format only; the chat "
                                  "format renders through the tokenizer's chat template (use template 'auto')")
        if not has_template:
            raise DataFormatError(f"{source}: format 'chat' renders messages through the tokenizer's chat "
                                  "template, and this tokenizer has none; use a tokenizer with a chat_template, "
                                  "or the alpaca or text format")
        return "chat_template"
    if template == "auto":
        return "chat_template" if has_template else "alpaca"
    if template == "chat_template" and not has_template:
        raise DataFormatError(f"{source}: template 'chat_template' needs a tokenizer with a chat template, and "
                              "this tokenizer has none; use template 'alpaca' or 'auto'")
    return template


def _string(record: dict[str, Any], field: str, needs: str, required: bool = True) -> str:
    value = record.get(field)
    if value is None:
        if not required:
            return ""
        raise RecordError(f"has no {field!r} field; {needs}; this record has {present_fields(record)}")
    if not isinstance(value, str):
        raise RecordError(f"field {field!r} must be a string, got {describe(value)}")
    return value


def alpaca_pieces(tokenizer: Any, record: dict[str, Any], template: str, train_on_inputs: bool) -> list[Piece]:
    needs = "the alpaca format needs 'instruction' and 'output' (and optionally 'input')"
    instruction = _string(record, "instruction", needs)
    extra = _string(record, "input", needs, required=False)
    output = _string(record, "output", needs)
    if not output.strip():
        return []
    if template == "chat_template":
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return [chat_example(tokenizer, messages, train_on_inputs)]
    prompt_template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    prompt = encode(tokenizer, prompt_template.format(instruction=instruction, input=extra), special=True)
    ids = prompt + encode(tokenizer, output, special=False)
    if ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return [labelled(ids, [train_on_inputs] * len(prompt) + [True] * (len(ids) - len(prompt)))]


def chat_pieces(tokenizer: Any, record: dict[str, Any], field: str, train_on_inputs: bool) -> list[Piece]:
    messages = chat_messages(record, field)
    if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
        return []
    return [chat_example(tokenizer, messages, train_on_inputs)]


def text_pieces(tokenizer: Any, record: dict[str, Any], field: str, max_seq_length: int) -> list[Piece]:
    text = _string(record, field, f"the text format needs {field!r}")
    if not text.strip():
        return []
    ids = encode(tokenizer, text, special=True)
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    pieces, start = [], 0
    while True:
        chunk = ids[start: start + max_seq_length]
        pieces.append(labelled(chunk, [True] * len(chunk)))
        if start + max_seq_length >= len(ids):
            return pieces
        start += max_seq_length - 1


def record_pieces(tokenizer: Any, record: Any, *, fmt: str, template: str, train_on_inputs: bool,
                  max_seq_length: int, text_field: str, messages_field: str) -> list[Piece]:
    """The pieces of one record (several for a long text, none when there is nothing to learn)."""
    if not isinstance(record, dict):
        raise RecordError(f"must be a mapping of fields, got {describe(record)}")
    if fmt == "alpaca":
        return alpaca_pieces(tokenizer, record, template, train_on_inputs)
    if fmt == "chat":
        return chat_pieces(tokenizer, record, messages_field, train_on_inputs)
    return text_pieces(tokenizer, record, text_field, max_seq_length)


def format_fields(fmt: str, text_field: str, messages_field: str) -> tuple[str, ...]:
    """The record fields a format reads (part of the cache key)."""
    return {"alpaca": ALPACA_FIELDS, "chat": (messages_field,), "text": (text_field,)}[fmt]
