"""Attention of rows that share a prefix, computed in the layout where each row holds one sequence.

A preference batch can run each pair's prompt once (train/shared_prompt.py: one row [prompt | chosen | rejected]
per pair). Its linears then see fewer tokens, but the attention of that row is not causal: the rejected tokens
must not see the chosen ones. A 4-D mask says so, and costs a full L x L attention without the flash kernels'
skipping of masked blocks. `attend_rows` instead gathers the queries, keys and values into the layout of one
sequence per row (prompt + chosen, prompt + rejected: TRL's), runs plain causal attention there (the flash and
cuDNN kernels, no mask), and writes each position's output back to the one shared position it belongs to. The
prompt's keys and values reach both of its sequences, so their gradients sum both, as the two copies' would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class RowMap:
    """Positions of the sequence layout [S rows, T] against the shared one [N rows, L] (flat indices):
    gather [S * T]: the shared position each sequence position reads (any position on its padding);
    src, dst [K]: the sequence positions whose outputs are kept and the shared positions they go to, each shared
    position that holds a token exactly once."""

    gather: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    rows: int
    cols: int

    def to(self, device: torch.device) -> RowMap:
        return RowMap(self.gather.to(device, non_blocking=True), self.src.to(device, non_blocking=True),
                      self.dst.to(device, non_blocking=True), self.rows, self.cols)


def _to_sequences(t: torch.Tensor, rows: RowMap) -> torch.Tensor:
    """[N, heads, L, D] -> [S, heads, T, D]."""
    n, heads, length, d = t.shape
    flat = t.transpose(1, 2).reshape(n * length, heads, d)
    return flat.index_select(0, rows.gather).view(rows.rows, rows.cols, heads, d).transpose(1, 2)


def attend_rows(attend: Callable[..., tuple[torch.Tensor, Any]], module: torch.nn.Module, q: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, rows: RowMap, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function `attend` (sdpa or flash: causal without a mask) over the shared rows'
    q, k, v [N, heads, L, D] as their sequences; returns the output [N, L, heads, D] as `attend` returns it
    (positions without a token hold zeros) and no weights."""
    n, length = q.shape[0], q.shape[2]
    out, _ = attend(module, _to_sequences(q, rows), _to_sequences(k, rows), _to_sequences(v, rows), None, **kwargs)
    heads, d = out.shape[2], out.shape[3]
    kept = out.reshape(rows.rows * rows.cols, heads, d).index_select(0, rows.src)
    shared = kept.new_zeros(n * length, heads, d).index_copy(0, rows.dst, kept)
    return shared.view(n, length, heads, d), None
