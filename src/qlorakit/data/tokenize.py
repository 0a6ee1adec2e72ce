"""Records of one file -> TokenizedExamples, applying the overlong policy and counting what it did."""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import DataFormatError
from .examples import TokenizedExamples
from .formats import record_pieces
from .pieces import IGNORE_INDEX, RecordError
from .report import TokenizeStats

OVERLONG_POLICIES = ("drop", "truncate")


def tokenize_records(records: Sequence[Any], tokenizer: Any, *, source: str, fmt: str, template: str,
                     train_on_inputs: bool, max_seq_length: int, overlong: str, text_field: str,
                     messages_field: str) -> tuple[TokenizedExamples, TokenizeStats]:
    """Tokenise every record; template is already resolved ('chat_template', 'alpaca' or 'none').

    An alpaca or chat example longer than max_seq_length is dropped (overlong='drop') or cut to its first
    max_seq_length tokens (overlong='truncate': the labels are cut alike, so a cut response ends without EOS;
    one whose prompt alone fills max_seq_length has nothing left to learn and is dropped). Texts are split
    instead (see formats.py). Raises DataFormatError naming `source` and the record for a bad record, and
    when no example is left.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {', '.join(OVERLONG_POLICIES)}, got {overlong!r}")
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if tokenizer.eos_token_id is None:
        raise DataFormatError(f"{source}: the tokenizer has no eos_token; examples must end with one")
    if not records:
        raise DataFormatError(f"{source}: the file holds no records")
    kept: list[tuple[list[int], list[int], int]] = []
    empty = dropped = truncated = split_texts = chunks = longest = 0
    for index, record in enumerate(records):
        try:
            pieces = record_pieces(tokenizer, record, fmt=fmt, template=template, train_on_inputs=train_on_inputs,
                                   max_seq_length=max_seq_length, text_field=text_field,
                                   messages_field=messages_field)
        except RecordError as err:
            raise DataFormatError(f"{source}: record {index} {err}") from None
        if not pieces:
            empty += 1
            continue
        if len(pieces) > 1:
            split_texts += 1
            chunks += len(pieces)
        for ids, labels in pieces:
            longest = max(longest, len(ids))
            if len(ids) > max_seq_length:
                if overlong == "drop":
                    dropped += 1
                    continue
                ids, labels = ids[:max_seq_length], labels[:max_seq_length]
                if all(label == IGNORE_INDEX for label in labels):
                    dropped += 1
                    continue
                truncated += 1
            kept.append((ids, labels, index))
    stats = TokenizeStats(records=len(records), examples=len(kept), empty=empty, dropped=dropped,
                          truncated=truncated, split_texts=split_texts, chunks=chunks, longest=longest)
    if not kept and dropped:
        what = "prompt fills" if overlong == "truncate" else "is longer than"
        hint = "" if overlong == "truncate" else " or use overlong='truncate'"
        raise DataFormatError(f"{source}: every example {what} max_seq_length {max_seq_length} tokens "
                              f"({stats.describe(max_seq_length)}); raise max_seq_length{hint}")
    if not kept:
        raise DataFormatError(f"{source}: no examples left after filtering ({stats.describe(max_seq_length)})")
    return TokenizedExamples.from_pieces(kept), stats
