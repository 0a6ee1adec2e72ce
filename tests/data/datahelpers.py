"""Helpers for the data-layer tests: the tiny tokenizers (tests/tiny_tokenizers.py), data writers, mask readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tiny_tokenizers import make_chatml_tokenizer, make_plain_tokenizer  # noqa: F401 (re-exported)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def target_spans(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """The decoded runs of consecutive positions that carry loss, checking labels equal ids there."""
    ids, labels = np.asarray(ids), np.asarray(labels)
    keep = labels != -100
    assert np.array_equal(labels[keep], ids[keep])
    spans, run = [], []
    for token, k in zip(ids.tolist(), keep.tolist()):
        if k:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tokenizer.decode(s, skip_special_tokens=False) for s in spans]


ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep well."},
    {"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour."},
    {"instruction": "What is two plus two?", "input": "", "output": "Four."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
]
