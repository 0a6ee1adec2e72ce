"""Tokenised examples cached on disk, so that a restart does not tokenise again.

An entry is cache_dir/<key>/ holding ids.npy, labels.npy, offsets.npy, record_ids.npy and manifest.json.
The key is a SHA-256 over everything the examples depend on: the data file's bytes, the tokenizer (its
serialisation, special tokens and chat template), the format, template, fields, train_on_inputs,
max_seq_length, overlong policy, and CACHE_VERSION, which changes whenever the rendering code does. An entry is
written into a temporary folder and renamed into place, so a reader sees a whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..atomic import swap_in
from .examples import TokenizedExamples
from .report import TokenizeStats

log = logging.getLogger("qlorakit.data")

CACHE_VERSION = 1
_ARRAYS = ("ids", "labels", "offsets", "record_ids")
T = TypeVar("T")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hex SHA-256 of what decides how the tokenizer encodes and renders: vocabulary, merges, normaliser,
    pre-tokenizer, post-processor, added and special tokens, and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {"special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
             "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
             "chat_template": getattr(tokenizer, "chat_template", None)}
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def cache_key(*, data_sha256: str, tokenizer_sha256: str, fmt: str, template: str, fields: tuple[str, ...],
              train_on_inputs: bool, max_seq_length: int, overlong: str) -> str:
    """Hex SHA-256 naming the cache entry of one file's tokenised examples."""
    parts = {"version": CACHE_VERSION, "data": data_sha256, "tokenizer": tokenizer_sha256, "format": fmt,
             "template": template, "fields": list(fields), "train_on_inputs": train_on_inputs,
             "max_seq_length": max_seq_length, "overlong": overlong}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_entry(entry: Path, key: str, version: int, names: tuple[str, ...], what: str,
               build: Callable[[dict[str, np.ndarray], dict[str, Any]], T]) -> T | None:
    """build(arrays, manifest) of an entry folder (names.npy each, manifest.json) whose manifest holds `key` and
    `version`; None when there is none. A damaged entry (unreadable, another key, or refused by `build`) is logged
    (`what` names the cache), removed, and missed."""
    if not (entry / "manifest.json").is_file():
        return None
    try:
        manifest = json.loads((entry / "manifest.json").read_text(encoding="utf-8"))
        if manifest["version"] != version or manifest["key"] != key:
            raise ValueError("manifest does not match its key")
        return build({name: np.load(entry / f"{name}.npy", allow_pickle=False) for name in names}, manifest)
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("qlorakit: %s entry %s is damaged (%s); tokenising again", what, entry, err)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def save_entry(entry: Path, arrays: dict[str, np.ndarray], manifest: dict[str, Any]) -> Path:
    """Write `arrays` (name.npy each) and manifest.json as the folder `entry`, atomically: built in a temporary
    folder beside it and renamed into place. A concurrent writer of the same entry that finished first keeps its
    (identical) one."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name[:22]}-", dir=entry.parent))
    try:
        for name, array in arrays.items():
            np.save(scratch / f"{name}.npy", array, allow_pickle=False)
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        swap_in(scratch, entry, theirs_ok=lambda e: (e / "manifest.json").is_file())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return entry


def load_cached(cache_dir: str | Path, key: str) -> tuple[TokenizedExamples, TokenizeStats] | None:
    """The entry for key, or None when there is none (a damaged entry is logged, removed, and missed)."""
    return load_entry(Path(cache_dir) / key, key, CACHE_VERSION, _ARRAYS, "data cache",
                      lambda arrays, manifest: (TokenizedExamples(**arrays), TokenizeStats(**manifest["stats"])))


def save_cached(cache_dir: str | Path, key: str, examples: TokenizedExamples, stats: TokenizeStats) -> Path:
    """Write the entry for key atomically; returns its folder. A concurrent writer of the same key wins
    harmlessly: both wrote the same content."""
    manifest = {"version": CACHE_VERSION, "key": key, "examples": len(examples), "stats": asdict(stats)}
    return save_entry(Path(cache_dir) / key, {name: getattr(examples, name) for name in _ARRAYS}, manifest)
