"""Tokenised preference pairs cached on disk, as data/cache.py caches SFT examples.

An entry is cache_dir/pairs-<key>/ holding the six arrays of the prompts', chosen and rejected Ragged sequences,
record_ids.npy and manifest.json (the PairReport). The key is a SHA-256 over the data file's bytes, the tokenizer
(cache.tokenizer_fingerprint: vocabulary, special tokens, chat template), max_length, max_prompt_length and
PAIR_CACHE_VERSION, which changes whenever pairs.py's rendering or truncation does. Entries are written to a
temporary folder and renamed into place; a damaged one is logged, removed and tokenised again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .cache import load_entry, save_entry, tokenizer_fingerprint
from .pair_examples import PairExamples, Ragged
from .pairs import PairReport, read_pairs, tokenize_pairs
from .readers import file_sha256

log = logging.getLogger("qlorakit.data")

PAIR_CACHE_VERSION = 1
_PARTS = ("prompts", "chosen", "rejected")
_ARRAYS = (*(f"{p}_{a}" for p in _PARTS for a in ("ids", "offsets")), "record_ids")


def pair_cache_key(data_sha256: str, tokenizer_sha256: str, max_length: int, max_prompt_length: int | None) -> str:
    parts = {"version": PAIR_CACHE_VERSION, "data": data_sha256, "tokenizer": tokenizer_sha256,
             "max_length": max_length, "max_prompt_length": max_prompt_length}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_pairs(path: str | Path, tokenizer: Any, max_length: int, max_prompt_length: int | None,
               cache_dir: str | Path | None) -> tuple[PairExamples, PairReport, bool]:
    """(pairs, report, cache hit) for a preference file: read from cache_dir when an entry matches, otherwise
    read_pairs + tokenize_pairs (whose errors are one line naming the file) and stored there. cache_dir None
    tokenises every time."""
    path = Path(path)
    if cache_dir is None:
        pairs, report = tokenize_pairs(read_pairs(path), tokenizer, max_length, max_prompt_length, source=str(path))
        return pairs, report, False
    key = pair_cache_key(file_sha256(path), tokenizer_fingerprint(tokenizer), max_length, max_prompt_length)
    entry = Path(cache_dir) / f"pairs-{key}"
    cached = _load(entry, key)
    if cached is not None:  # the same bytes may sit under another name now: the report names this one
        return cached[0], replace(cached[1], source=str(path)), True
    pairs, report = tokenize_pairs(read_pairs(path), tokenizer, max_length, max_prompt_length, source=str(path))
    _save(entry, key, pairs, report)
    return pairs, report, False


def _load(entry: Path, key: str) -> tuple[PairExamples, PairReport] | None:
    def build(arrays: dict, manifest: dict) -> tuple[PairExamples, PairReport]:
        parts = [Ragged(arrays[f"{p}_ids"], arrays[f"{p}_offsets"]) for p in _PARTS]
        return PairExamples(*parts, arrays["record_ids"]), PairReport(**manifest["report"])

    return load_entry(entry, key, PAIR_CACHE_VERSION, _ARRAYS, "pair cache", build)


def _save(entry: Path, key: str, pairs: PairExamples, report: PairReport) -> None:
    arrays = {f"{p}_{a}": getattr(getattr(pairs, p), a) for p in _PARTS for a in ("ids", "offsets")}
    arrays["record_ids"] = pairs.record_ids
    save_entry(entry, arrays, {"version": PAIR_CACHE_VERSION, "key": key, "pairs": len(pairs),
                               "report": asdict(report)})
