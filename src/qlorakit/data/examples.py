"""Tokenised examples stored as flat arrays, and the held-out split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .collate import collate
from .pieces import IGNORE_INDEX


@dataclass(frozen=True, eq=False)
class TokenizedExamples:
    """n examples, example i being ids[offsets[i]:offsets[i + 1]] with the labels at the same positions.

    ids, labels: int32 [N] (labels IGNORE_INDEX where a position carries no loss); offsets: int64 [n + 1],
    offsets[0] == 0, non-decreasing, offsets[-1] == N; record_ids: int64 [n], the index of the record each
    example came from in its file (the chunks of one long text share it).
    """

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    record_ids: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.dtype != np.int32 or self.labels.dtype != np.int32 or self.ids.shape != self.labels.shape:
            raise ValueError("ids and labels must be int32 arrays of one shape")
        if self.offsets.dtype != np.int64 or self.record_ids.dtype != np.int64:
            raise ValueError("offsets and record_ids must be int64")
        n = len(self.record_ids)
        if self.offsets.shape != (n + 1,) or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError(f"offsets must be [n + 1] from 0 to {len(self.ids)}")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")

    @classmethod
    def from_pieces(cls, pieces: Sequence[tuple[list[int], list[int], int]]) -> "TokenizedExamples":
        """From (ids, labels, record_id) triples."""
        lengths = np.array([len(ids) for ids, _, _ in pieces], dtype=np.int64)
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((t for p in pieces for t in p[0]), dtype=np.int32, count=int(offsets[-1]))
        labels = np.fromiter((t for p in pieces for t in p[1]), dtype=np.int32, count=int(offsets[-1]))
        record_ids = np.array([r for _, _, r in pieces], dtype=np.int64)
        return cls(ids, labels, offsets, record_ids)

    def __len__(self) -> int:
        return len(self.record_ids)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n]: tokens per example."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    @property
    def num_target_tokens(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) of example i, int32 [length] views."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i %= len(self)
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.ids[start:end], self.labels[start:end]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "TokenizedExamples":
        """A copy holding the given examples, in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = (np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices])
                  if len(indices) else np.zeros(0, dtype=np.int64))
        return TokenizedExamples(self.ids[gather], self.labels[gather], offsets, self.record_ids[indices])

    def collate(self, rows: Sequence[Sequence[int]], pad_id: int,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
        """One batch of rows of example indices; see collate.collate."""
        return collate(self, rows, pad_id, pad_to_multiple_of)


def split_eval(record_ids: Sequence[int] | np.ndarray, eval_fraction: float, seed: int,
               max_eval_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split examples into train and eval by record, so the chunks of one text stay on one side.

    record_ids: int [n], the source record of each example. Holds out round(eval_fraction * records) records,
    at least one when eval_fraction > 0, at most max_eval_examples, and always leaves one for training (so
    none with a single record). Returns sorted int64 example indices (train, eval). Deterministic in seed.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    record_ids = np.asarray(record_ids, dtype=np.int64)
    everything = np.arange(len(record_ids), dtype=np.int64)
    records = np.unique(record_ids)
    n_eval = max(1, round(eval_fraction * len(records))) if eval_fraction > 0 else 0
    if max_eval_examples is not None:
        n_eval = min(n_eval, max_eval_examples)
    n_eval = min(n_eval, len(records) - 1)
    if n_eval <= 0:
        return everything, np.zeros(0, dtype=np.int64)
    chosen = np.random.default_rng(seed).choice(records, size=n_eval, replace=False)
    held_out = np.isin(record_ids, chosen)
    return everything[~held_out], everything[held_out]
