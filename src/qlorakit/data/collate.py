"""Batches of (possibly packed) rows as tensors, and the attention mask that keeps packed examples apart."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch

from .pieces import IGNORE_INDEX


class _Examples(Protocol):
    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]: ...


def collate(examples: _Examples, rows: Sequence[Sequence[int]], pad_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Lay out each row's examples one after another, right-padded to the longest row.

    rows: B lists of example indices (one index per row when not packing). T is the longest row, rounded up
    to a multiple of pad_to_multiple_of when given. Returns CPU tensors:
      input_ids [B, T] int64, pad_id on padding;
      labels [B, T] int64, IGNORE_INDEX on padding (by position: a pad id equal to EOS is never masked);
      position_ids [B, T] int64, restarting at 0 for every example, 0 on padding;
      segment_ids [B, T] int32, 1..k for the k examples of a row, 0 on padding;
      attention_mask [B, T] int64, 1 on real tokens, 0 on padding.
    """
    pieces = [[examples.get(i) for i in row] for row in rows]
    widths = [sum(len(ids) for ids, _ in row) for row in pieces]
    T = max(widths, default=0)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(rows)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    segment_ids = np.zeros((B, T), dtype=np.int32)
    for b, row in enumerate(pieces):
        at = 0
        for k, (ids, lab) in enumerate(row, start=1):
            n = len(ids)
            input_ids[b, at:at + n] = ids
            labels[b, at:at + n] = lab
            position_ids[b, at:at + n] = np.arange(n)
            segment_ids[b, at:at + n] = k
            at += n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "segment_ids": torch.from_numpy(segment_ids),
        "attention_mask": torch.from_numpy((segment_ids > 0).astype(np.int64)),
    }


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask [B, 1, T, T] of `dtype`, on segment_ids' device, from segment_ids [B, T].

    0 where query and key lie in the same example and key <= query, the dtype's minimum elsewhere. A padding
    query attends to itself only, so that no row is all-masked (softmax over nothing gives NaN). Given to a
    Hugging Face model as attention_mask together with restarting position_ids, a packed row gives the same
    logits as its examples run one by one; position_ids alone do not keep the examples apart.
    """
    T = segment_ids.shape[-1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (query == key) & causal & (query > 0)
    allowed |= torch.eye(T, dtype=torch.bool, device=segment_ids.device) & (query == 0)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
