"""Tokenised preference pairs stored as flat arrays, their batches in TRL's DPOTrainer layout, the held-out split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class Ragged:
    """n token sequences, sequence i being ids[offsets[i]:offsets[i + 1]]; ids int32 [N], offsets int64 [n + 1]."""

    ids: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.dtype != np.int32 or self.offsets.dtype != np.int64:
            raise ValueError("ids must be int32 and offsets int64")
        if len(self.offsets) == 0 or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError(f"offsets must run from 0 to {len(self.ids)}")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")

    @classmethod
    def from_lists(cls, sequences: Sequence[Sequence[int]]) -> "Ragged":
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in sequences], out=offsets[1:])
        ids = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def subset(self, indices: np.ndarray) -> "Ragged":
        return Ragged.from_lists([self.get(int(i)) for i in indices])


@dataclass(frozen=True, eq=False)
class PairExamples:
    """n preference pairs: pair i is prompts.get(i) followed by chosen.get(i), or by rejected.get(i).

    The completions end with their EOS (or the chat template's end of turn) unless truncation cut it off.
    record_ids: int64 [n], the index in its file of the record each pair came from.
    reference: None, or float32 [n, 2]: each pair's precomputed reference log-probs (chosen, rejected), which
    collate then hands on as `ref_logps` (training.precompute_ref_logps; train/reference_cache.py).
    """

    prompts: Ragged
    chosen: Ragged
    rejected: Ragged
    record_ids: np.ndarray
    reference: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.record_ids)
        if self.record_ids.dtype != np.int64 or not len(self.prompts) == len(self.chosen) == len(self.rejected) == n:
            raise ValueError("prompts, chosen, rejected and record_ids (int64) must hold one entry per pair")
        if self.reference is not None and (self.reference.dtype != np.float32 or self.reference.shape != (n, 2)):
            raise ValueError(f"reference must be float32 [{n}, 2], got {self.reference.dtype} "
                             f"{list(self.reference.shape)}")

    def with_reference(self, reference: np.ndarray) -> "PairExamples":
        """A copy carrying the pairs' reference log-probs, float32 [n, 2] (chosen, rejected)."""
        return PairExamples(self.prompts, self.chosen, self.rejected, self.record_ids, reference)

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[list[int], list[int], list[int], int]]) -> "PairExamples":
        """From (prompt ids, chosen ids, rejected ids, record_id) tuples."""
        return cls(Ragged.from_lists([p[0] for p in pairs]), Ragged.from_lists([p[1] for p in pairs]),
                   Ragged.from_lists([p[2] for p in pairs]), np.array([p[3] for p in pairs], dtype=np.int64))

    def fingerprint_arrays(self) -> list[np.ndarray]:
        """What a run's data fingerprint hashes (train/run_state.examples_fingerprint)."""
        return [a for part in (self.prompts, self.chosen, self.rejected) for a in (part.ids, part.offsets)]

    def __len__(self) -> int:
        return len(self.record_ids)

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n]: tokens of each pair's longer sequence, prompt + chosen or prompt + rejected."""
        return self.prompts.lengths + np.maximum(self.chosen.lengths, self.rejected.lengths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, chosen, rejected) ids of pair i, int32 views."""
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range for {len(self)} pairs")
        return self.prompts.get(i), self.chosen.get(i), self.rejected.get(i)

    def subset(self, indices: Sequence[int] | np.ndarray) -> "PairExamples":
        """A copy holding the given pairs, in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        return PairExamples(self.prompts.subset(indices), self.chosen.subset(indices),
                            self.rejected.subset(indices), self.record_ids[indices],
                            None if self.reference is None else self.reference[indices])

    def split(self, eval_pairs: int, seed: int) -> tuple["PairExamples", "PairExamples"]:
        """(train, eval): eval_pairs pairs drawn at random (deterministic in seed) are held out; both keep file
        order. At least one pair is left for training."""
        if not 0 <= eval_pairs < len(self):
            raise ValueError(f"eval_pairs must be in [0, {len(self)}) for {len(self)} pairs (at least one pair "
                             f"stays for training), got {eval_pairs}")
        held = np.zeros(len(self), dtype=bool)
        held[np.random.default_rng(seed).choice(len(self), size=eval_pairs, replace=False)] = True
        everything = np.arange(len(self))
        return self.subset(everything[~held]), self.subset(everything[held])

    def collate(self, rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
        """One batch of N pairs, one pair index per row, laid out as TRL's DPOTrainer collates them.

        Returns CPU int64 tensors [2N, T]: the N prompt + chosen sequences first, then the N prompt + rejected
        sequences in the same order, right-padded to the longest of the 2N (T):
          input_ids: pad_id on padding;
          attention_mask: 1 on real tokens, 0 on padding;
          completion_mask: 1 on the chosen or rejected tokens (EOS included), 0 on the prompt and padding;
        and, when the pairs carry precomputed reference log-probs, ref_logps float32 [N, 2] (chosen, rejected).
        Raises ValueError for a row holding other than one index: preference pairs are never packed.
        """
        for row in rows:
            if len(row) != 1:
                raise ValueError(f"each row holds exactly one pair index (preference pairs are not packed), "
                                 f"got a row of {len(row)}: {list(row)[:8]}")
        pairs = [self.get(int(row[0])) for row in rows]
        sequences = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
        T = max((len(p) + len(c) for p, c in sequences), default=0)
        input_ids = np.full((len(sequences), T), pad_id, dtype=np.int64)
        attention = np.zeros((len(sequences), T), dtype=np.int64)
        completion = np.zeros((len(sequences), T), dtype=np.int64)
        for b, (prompt, reply) in enumerate(sequences):
            n_p, end = len(prompt), len(prompt) + len(reply)
            input_ids[b, :n_p] = prompt
            input_ids[b, n_p:end] = reply
            attention[b, :end] = 1
            completion[b, n_p:end] = 1
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
                 "completion_mask": torch.from_numpy(completion)}
        if self.reference is not None:
            batch["ref_logps"] = torch.from_numpy(self.reference[[int(row[0]) for row in rows]])
        return batch
