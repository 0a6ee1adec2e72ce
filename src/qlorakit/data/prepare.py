"""prepare_data: a data file and a tokenizer -> tokenised train and eval examples and a report."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import cache_key, load_cached, save_cached, tokenizer_fingerprint
from .examples import TokenizedExamples, split_eval
from .formats import format_fields, resolve_template
from .readers import check_data_file, file_sha256, load_records
from .report import DataReport, TokenizeStats
from .tokenize import tokenize_records

log = logging.getLogger("qlorakit.data")


@dataclass(frozen=True)
class PreparedData:
    train: TokenizedExamples
    eval: TokenizedExamples | None
    report: DataReport


def prepare_data(path: str | Path, tokenizer: Any, *, fmt: str, max_seq_length: int, template: str = "auto",
                 train_on_inputs: bool = False, text_field: str = "text", messages_field: str = "messages",
                 eval_file: str | Path | None = None, eval_fraction: float = 0.05,
                 max_eval_examples: int | None = None, seed: int = 42, overlong: str = "drop",
                 cache_dir: str | Path | None) -> PreparedData:
    """Read, render, tokenise (or load from cache_dir) and split a data file; log a one-line report.

    fmt: 'alpaca', 'chat' or 'text'; template: 'auto', 'chat_template' or 'alpaca' (formats.py). The loss
    covers the responses only unless train_on_inputs. overlong: 'drop' or 'truncate' (tokenize.py).
    Eval examples come from eval_file when given (its first max_eval_examples), else from holding out
    eval_fraction of the records (split_eval, seeded by seed); eval is None when nothing is held out.
    cache_dir None tokenises every time. Raises DataFormatError, one line naming the file, for any problem
    with the data or a tokenizer that cannot render it.
    """
    source = str(path)
    resolved = resolve_template(fmt, template, tokenizer, source)
    settings = {"fmt": fmt, "template": resolved, "train_on_inputs": train_on_inputs,
                "max_seq_length": max_seq_length, "overlong": overlong, "text_field": text_field,
                "messages_field": messages_field}
    everything, stats, hit = _tokenize_file(path, tokenizer, settings, cache_dir)
    eval_stats: TokenizeStats | None = None
    if eval_file is not None:
        train = everything
        held_out, eval_stats, eval_hit = _tokenize_file(eval_file, tokenizer, settings, cache_dir)
        if max_eval_examples is not None:
            held_out = held_out.subset(range(min(max_eval_examples, len(held_out))))
        hit = hit and eval_hit
    else:
        train_idx, eval_idx = split_eval(everything.record_ids, eval_fraction, seed, max_eval_examples)
        train, held_out = everything.subset(train_idx), everything.subset(eval_idx)
    report = DataReport(path=source, fmt=fmt, template=resolved, max_seq_length=max_seq_length, train_file=stats,
                        eval_file=eval_stats, train_examples=len(train), eval_examples=len(held_out),
                        train_tokens=train.num_tokens, train_target_tokens=train.num_target_tokens, cache_hit=hit)
    lost = stats.dropped + stats.truncated + (eval_stats.dropped + eval_stats.truncated if eval_stats else 0)
    log.log(logging.WARNING if lost else logging.INFO, "qlorakit: %s", report.summary())
    return PreparedData(train=train, eval=held_out if len(held_out) else None, report=report)


def _tokenize_file(path: str | Path, tokenizer: Any, settings: dict[str, Any],
                   cache_dir: str | Path | None) -> tuple[TokenizedExamples, TokenizeStats, bool]:
    p = check_data_file(path)
    key = None
    if cache_dir is not None:
        fields = format_fields(settings["fmt"], settings["text_field"], settings["messages_field"])
        key = cache_key(data_sha256=file_sha256(p), tokenizer_sha256=tokenizer_fingerprint(tokenizer),
                        fmt=settings["fmt"], template=settings["template"], fields=fields,
                        train_on_inputs=settings["train_on_inputs"], max_seq_length=settings["max_seq_length"],
                        overlong=settings["overlong"])
        cached = load_cached(cache_dir, key)
        if cached is not None:
            return (*cached, True)
    examples, stats = tokenize_records(load_records(p), tokenizer, source=str(path), **settings)
    if key is not None:
        save_cached(cache_dir, key, examples, stats)
    return examples, stats, False
