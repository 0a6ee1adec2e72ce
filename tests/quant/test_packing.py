"""Nibble packing: element 2j in the high nibble of byte j, 2j+1 in the low one; odd lengths padded with zero."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlorakit.quant import code_4bit, pack_nibbles, quantize_blocks_4bit, unpack_nibbles


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=2000))
def test_unpack_inverts_pack(codes):
    n = len(codes)
    codes = torch.tensor(codes, dtype=torch.uint8)
    padded = torch.nn.functional.pad(codes, (0, n % 2))
    packed = pack_nibbles(padded)
    assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2,)
    assert torch.equal(unpack_nibbles(packed, n), codes)


def test_element_2j_is_the_high_nibble():
    packed = pack_nibbles(torch.tensor([0x1, 0x2, 0x3, 0x4, 0xF, 0x0, 0x0, 0xF]))
    assert packed.tolist() == [0x12, 0x34, 0xF0, 0x0F]
    assert unpack_nibbles(torch.tensor([0xAB], dtype=torch.uint8), 2).tolist() == [0xA, 0xB]


def test_pack_accepts_any_integer_dtype_and_shape():
    codes = torch.arange(16, dtype=torch.int64).reshape(4, 4)
    assert torch.equal(pack_nibbles(codes), pack_nibbles(codes.reshape(-1).to(torch.uint8)))


def test_unpack_reads_other_storage_dtypes_as_bytes():
    # bitsandbytes can store packed weights in another dtype (quant_storage); the bytes are what count.
    packed = pack_nibbles(torch.randint(0, 16, (64,), generator=torch.Generator().manual_seed(0)))
    for storage in (torch.int8, torch.float16, torch.bfloat16, torch.float32):
        assert torch.equal(unpack_nibbles(packed.view(storage), 64), unpack_nibbles(packed, 64))


def test_unpack_stops_at_n_and_ignores_the_padding_nibble():
    assert unpack_nibbles(torch.tensor([0x12, 0x37], dtype=torch.uint8), 3).tolist() == [1, 2, 3]


def test_pack_refuses_an_odd_number_of_codes():
    with pytest.raises(ValueError, match="even number of codes, got 3"):
        pack_nibbles(torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("length", [1, 3, 65, 4097])
def test_odd_length_is_padded_with_the_code_of_zero(quant_type, length):
    x = torch.randn(length, generator=torch.Generator().manual_seed(length)) + 3.0  # no value near zero
    packed, _ = quantize_blocks_4bit(x, 64, quant_type)
    assert packed.shape == ((length + 1) // 2, 1)
    zero_code = 7 if quant_type == "nf4" else 0
    assert code_4bit(quant_type)[zero_code].item() == 0.0
    assert packed[-1, 0].item() & 0xF == zero_code
    assert packed[-1, 0].item() >> 4 != zero_code
