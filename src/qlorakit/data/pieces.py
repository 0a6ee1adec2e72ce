"""The (ids, labels) pair every format renders a record into, and the helpers that build one."""

from __future__ import annotations

from typing import Any

IGNORE_INDEX = -100
"""Label of a position that carries no loss (PyTorch's cross-entropy default `ignore_index`)."""

Piece = tuple[list[int], list[int]]
"""One example before storage: token ids and labels of equal length; labels are IGNORE_INDEX or the id."""


class RecordError(ValueError):
    """A record lacks a field or holds a value its format does not allow.

    The message is a phrase that follows "record <index> "; the caller adds the file and the index.
    """


def encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    """Token ids of `text`; `special` lets the tokenizer add its own BOS (or whatever its post-processor adds)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def labelled(ids: list[int], target: list[bool]) -> Piece:
    """Labels equal to the ids where `target` is true, IGNORE_INDEX elsewhere.

    labels[0] is always IGNORE_INDEX: nothing precedes the first token of an example, so it is never
    predicted, whether the example stands alone or sits inside a packed row.
    """
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, target, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return ids, labels


def describe(value: Any, width: int = 60) -> str:
    """A short one-line repr of a record value, for error messages."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def present_fields(record: dict[str, Any]) -> str:
    """The record's non-null keys, quoted, for "this record has ..." messages."""
    names = [repr(k) for k, v in record.items() if v is not None]
    return ", ".join(names) if names else "no fields"
