"""The calibration tokens of `qlorakit inspect --calibration-tokens N`: the first N tokens of a data file, read and
rendered as training reads and renders it (readers.py, formats.py), or of the built-in English text
(calibration_text.py). Never the hub.

Records are rendered one by one in file order (alpaca and chat through the tokenizer's chat template when it has
one, as template 'auto' does in training; text as a whole, BOS and EOS as the tokenizer adds them) and their ids
concatenated until N are there: the stream runs as one sequence, as calibration streams usually do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import DataFormatError
from ..model.inspect_outputs import Calibration
from .calibration_text import CALIBRATION_TEXT
from .formats import record_pieces, resolve_template
from .pieces import RecordError
from .readers import load_records, resolve_data_path

BUILT_IN = "the built-in English text"


def calibration_tokens(tokenizer: Any, tokens: int, data: str | None = None, fmt: str = "alpaca") -> Calibration:
    """The first `tokens` (>= 1) token ids of `data` ('default:NAME' for a bundled set, or a .json/.jsonl/.parquet/
    .csv file in format `fmt`: alpaca, chat or text) or, with data None, of the built-in text, as int64 [1, tokens].

    Raises DataFormatError, one line naming the source, when it is unreadable, a record does not fit `fmt`, or it
    holds fewer tokens than asked for.
    """
    if data is None:
        source, records, fmt = BUILT_IN, [{"text": CALIBRATION_TEXT}], "text"
    else:
        path = resolve_data_path(data)
        source, records = str(path), load_records(path)
    template = resolve_template(fmt, "auto", tokenizer, source)
    ids: list[int] = []
    for index, record in enumerate(records):
        try:
            pieces = record_pieces(tokenizer, record, fmt=fmt, template=template, train_on_inputs=True,
                                   max_seq_length=max(tokens, 2), text_field="text", messages_field="messages")
        except RecordError as err:
            raise DataFormatError(f"{source}: record {index} {err}") from None
        for piece_ids, _ in pieces:
            ids += piece_ids
        if len(ids) >= tokens:
            return Calibration(torch.tensor([ids[:tokens]], dtype=torch.long), _describe(source, fmt))
    more = "a longer --calibration-data FILE" if data is not None else "--calibration-data FILE"
    raise DataFormatError(f"{source}: {len(ids)} tokens with this tokenizer, fewer than the {tokens} calibration "
                          f"tokens asked for; ask for {len(ids)} or fewer (--calibration-tokens), or give {more}")


def _describe(source: str, fmt: str) -> str:
    return source if source == BUILT_IN else f"{Path(source).name} ({fmt})"
