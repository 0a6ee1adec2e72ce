"""The batch plan of one epoch: which examples go in which row of which batch.

A plan is a pure function of (lengths, batch_size, max_seq_length, packing, seed, epoch), so a resumed run
rebuilds it and skips to batch k of epoch e exactly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def epoch_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, max_seq_length: int, packing: bool,
                  seed: int, epoch: int) -> list[list[list[int]]]:
    """Batches of rows of example indices for one epoch.

    The example order is a permutation drawn from a generator seeded by (seed, epoch). Without packing each row
    is one example; with packing, consecutive examples of that order fill a row greedily while its total
    length stays <= max_seq_length. Rows are grouped into batches of batch_size; the last batch may be short.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed {seed}, epoch {epoch}")
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > max_seq_length)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"example {i} has {lengths[i]} tokens, more than max_seq_length {max_seq_length}")
    order = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(len(lengths))
    rows: list[list[int]] = []
    if not packing:
        rows = [[int(i)] for i in order]
    else:
        row: list[int] = []
        used = 0
        for i in order:
            n = int(lengths[i])
            if row and used + n > max_seq_length:
                rows.append(row)
                row, used = [], 0
            row.append(int(i))
            used += n
        if row:
            rows.append(row)
    return [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
