"""Collated batches: right padding, restarting positions, segments, and a mask that keeps examples apart."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlorakit.data import IGNORE_INDEX, TokenizedExamples, epoch_batches, packed_attention_mask

EOS = PAD = 1


def examples() -> TokenizedExamples:
    # every example ends with EOS = pad id, learned: its label is EOS
    pieces = [([5, 6, 7, EOS], [IGNORE_INDEX, IGNORE_INDEX, 7, EOS], 0),
              ([8, 9, EOS], [IGNORE_INDEX, 9, EOS], 1),
              ([10, 11, 12, 13, EOS], [IGNORE_INDEX, 11, 12, 13, EOS], 2)]
    return TokenizedExamples.from_pieces(pieces)


def test_flat_storage_round_trips_and_subsets_keep_order():
    ex = examples()
    assert len(ex) == 3 and ex.lengths.tolist() == [4, 3, 5] and ex.ids.dtype == np.int32
    assert ex.get(1)[0].tolist() == [8, 9, EOS] and ex.get(-1)[1].tolist() == [IGNORE_INDEX, 11, 12, 13, EOS]
    sub = ex.subset([2, 0])
    assert sub.get(0)[0].tolist() == ex.get(2)[0].tolist() and sub.record_ids.tolist() == [2, 0]


def test_packed_rows_restart_positions_and_number_segments_and_pad_by_position():
    batch = examples().collate([[0, 1], [2]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS, 8, 9, EOS], [10, 11, 12, 13, EOS, PAD, PAD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 0]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    # EOS == pad, yet the EOS that ends each example is learned and only the padding is ignored
    assert batch["labels"].tolist() == [[-100, -100, 7, EOS, -100, 9, EOS], [-100, 11, 12, 13, EOS, -100, -100]]
    assert batch["input_ids"].dtype == torch.int64 and batch["segment_ids"].dtype == torch.int32


def test_pad_to_multiple_of_rounds_the_width_up():
    batch = examples().collate([[2]], pad_id=PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 8) and batch["labels"][0, 5:].eq(IGNORE_INDEX).all()


def test_packed_mask_is_the_block_diagonal_of_per_example_causal_masks():
    batch = examples().collate([[0, 1], [2]], pad_id=PAD)
    mask = packed_attention_mask(batch["segment_ids"], torch.float32)
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.float32
    low = torch.finfo(torch.float32).min

    def causal(n):
        return torch.full((n, n), low).triu(1)

    expected = torch.full((2, 7, 7), low)
    expected[0, :4, :4] = causal(4)
    expected[0, 4:, 4:] = causal(3)
    expected[1, :5, :5] = causal(5)
    expected[1, 5, 5] = expected[1, 6, 6] = 0.0  # padding queries see themselves only: no all-masked row
    assert torch.equal(mask[:, 0], expected)


def test_packed_mask_follows_the_requested_dtype():
    seg = torch.tensor([[1, 1, 2, 0]], dtype=torch.int32)
    mask = packed_attention_mask(seg, torch.bfloat16)
    assert mask.dtype == torch.bfloat16 and mask[0, 0, 2, 1] == torch.finfo(torch.bfloat16).min
    assert torch.isfinite(torch.softmax(mask.float(), -1)).all()


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=8), batch_size=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_any_packed_plan_collates_to_rows_whose_mask_and_positions_match_each_example_alone(lengths, batch_size,
                                                                                             seed):
    rng = np.random.default_rng(seed)
    pieces = []
    for r, n in enumerate(lengths):
        ids = rng.integers(2, 50, size=n).tolist()
        pieces.append((ids, [IGNORE_INDEX] + ids[1:], r))
    ex = TokenizedExamples.from_pieces(pieces)
    for batch_rows in epoch_batches(ex.lengths, batch_size, 16, True, seed=seed, epoch=0):
        batch = ex.collate(batch_rows, pad_id=0)
        mask = packed_attention_mask(batch["segment_ids"])[:, 0]
        for b, row in enumerate(batch_rows):
            at = 0
            for k, i in enumerate(row, start=1):
                n = int(ex.lengths[i])
                block = slice(at, at + n)
                assert batch["input_ids"][b, block].tolist() == ex.get(i)[0].tolist()
                assert batch["labels"][b, block].tolist() == ex.get(i)[1].tolist()
                assert batch["position_ids"][b, block].tolist() == list(range(n))
                assert (batch["segment_ids"][b, block] == k).all()
                visible = mask[b, block] == 0  # [n, T]: which keys each of this example's queries sees
                assert torch.equal(visible[:, block], torch.ones(n, n, dtype=torch.bool).tril())
                assert visible.sum() == n * (n + 1) // 2  # and nothing outside its own block
                at += n
            assert (batch["labels"][b, at:] == IGNORE_INDEX).all() and (batch["segment_ids"][b, at:] == 0).all()
