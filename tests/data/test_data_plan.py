"""The batch plan of an epoch is deterministic, covers every example once, and respects max_seq_length."""

from __future__ import annotations

import numpy as np
import pytest

from qlorakit.data import epoch_batches

LENGTHS = np.random.default_rng(0).integers(2, 60, size=101)


def flat(plan):
    return [i for batch in plan for row in batch for i in row]


@pytest.mark.parametrize("packing", [False, True])
def test_the_same_epoch_gives_the_same_plan_so_a_resumed_run_continues_exactly(packing):
    first = epoch_batches(LENGTHS, 4, 64, packing, seed=7, epoch=3)
    again = epoch_batches(LENGTHS.tolist(), 4, 64, packing, seed=7, epoch=3)
    assert first == again
    assert epoch_batches(LENGTHS, 4, 64, packing, seed=7, epoch=4) != first
    assert epoch_batches(LENGTHS, 4, 64, packing, seed=8, epoch=3) != first


@pytest.mark.parametrize("packing", [False, True])
def test_each_epoch_uses_every_example_exactly_once(packing):
    for epoch in range(3):
        assert sorted(flat(epoch_batches(LENGTHS, 4, 64, packing, seed=1, epoch=epoch))) == list(range(len(LENGTHS)))


def test_unpacked_rows_hold_one_example_and_batches_batch_size_rows_but_the_last():
    plan = epoch_batches(LENGTHS, 4, 64, False, seed=1, epoch=0)
    assert all(len(row) == 1 for batch in plan for row in batch)
    assert [len(b) for b in plan] == [4] * 25 + [1]


def test_packed_rows_fill_greedily_in_shuffled_order_without_exceeding_max_seq_length():
    plan = epoch_batches(LENGTHS, 2, 64, True, seed=1, epoch=0)
    rows = [row for batch in plan for row in batch]
    assert all(LENGTHS[row].sum() <= 64 for row in rows)
    # greedy: the next row's first example would not have fitted in the row before it
    assert all(LENGTHS[a].sum() + LENGTHS[b[0]] > 64 for a, b in zip(rows, rows[1:]))
    assert flat(plan) == flat(epoch_batches(LENGTHS, 2, 64, False, seed=1, epoch=0))
    assert len(rows) < len(LENGTHS)


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="example 1 has 70 tokens, more than max_seq_length 64"):
        epoch_batches([3, 70], 1, 64, True, seed=0, epoch=0)
