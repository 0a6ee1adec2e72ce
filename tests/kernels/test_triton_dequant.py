"""The Triton dequantizer against the reference `quant.state.dequantize_4bit`, bit for bit.

Specification: out = dtype(code[q] * absmax) with the product in fp32 rounded once, the nested absmax decoded as
code8[q8] * absmax2 then + offset (two fp32 roundings), for any number of values (odd, not a multiple of the
blocksize), every blocksize, NF4 and FP4, nested or not, into fp32 / fp16 / bf16 / fp64.

Runs in Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1). The interpreter converts
fp32 to bf16 by truncation where a GPU rounds to nearest even (benchmarks/kernels.py checks the GPU case), so a
bf16 output is compared with the reference's fp32 values truncated to bf16: still exact, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from qlorakit.errors import QlorakitError
from qlorakit.kernels.triton_dequant import dequantize_4bit_triton, dequantize_into
from qlorakit.quant.state import dequantize_4bit, quantize_4bit

_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
           torch.float64: torch.int64}


def truncate_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by dropping the low 16 bits (what Triton's interpreter does), as a bf16 tensor."""
    bits = x.to(torch.float32).contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the value is already a bf16 value


def expected(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """The reference's output as the interpreter must produce it."""
    if dtype == torch.bfloat16:
        return truncate_to_bf16(dequantize_4bit(packed, state, torch.float32))
    return dequantize_4bit(packed, state, dtype)


def assert_bits_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    mismatch = (ours.contiguous().view(_INT_OF[ours.dtype]) != ref.contiguous().view(_INT_OF[ref.dtype])).sum()
    assert mismatch == 0, f"{int(mismatch)} of {ours.numel()} values differ"


def weights(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fresh_random_weights_are_bit_identical(quant_type, double_quant, dtype):
    for seed in range(2):
        packed, state = quantize_4bit(weights((48, 160), seed), 64, quant_type, double_quant)
        assert_bits_equal(dequantize_4bit_triton(packed, state, dtype), expected(packed, state, dtype))


# (shape, blocksize): why each is there.
EDGE_CASES = [
    pytest.param((37, 67), 64, id="odd-numel-K-not-a-multiple-of-the-blocksize"),
    pytest.param((1, 33), 32, id="one-row-odd-K-short-tail-block"),
    pytest.param((7,), 32, id="fewer-values-than-one-block"),
    pytest.param((1,), 64, id="a-single-value"),
    pytest.param((3, 4096), 4096, id="blocksize-4096"),
    pytest.param((5, 1000), 128, id="tail-block-of-104"),
    pytest.param((129, 32), 32, id="odd-rows-blocksize-32"),
]


@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("shape, blocksize", EDGE_CASES)
def test_edge_shapes_are_bit_identical(shape, blocksize, dtype):
    for quant_type, double_quant in (("nf4", True), ("fp4", False)):
        packed, state = quantize_4bit(weights(shape, 3), blocksize, quant_type, double_quant)
        out = dequantize_4bit_triton(packed, state, dtype)
        assert out.shape == torch.Size(shape)
        assert_bits_equal(out, expected(packed, state, dtype))


@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
def test_all_zero_blocks_and_extreme_scales(double_quant):
    w = weights((6, 256), 4)
    w[0] = 0.0  # four all-zero blocks (absmax 0)
    w[1, :64] = 1e-30  # a tiny block
    w[2, :64] *= 1e30  # a huge one
    w.view(-1)[-40:] = 0.0  # an all-zero tail
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit(w, 64, quant_type, double_quant)
        for dtype in (torch.float32, torch.bfloat16):
            assert_bits_equal(dequantize_4bit_triton(packed, state, dtype), expected(packed, state, dtype))


def test_bf16_and_fp16_sources_keep_their_state_dtype_but_dequantize_to_the_asked_one():
    packed, state = quantize_4bit(weights((16, 96), 5, torch.bfloat16), 32, "nf4", True)
    assert_bits_equal(dequantize_4bit_triton(packed, state, torch.float16), expected(packed, state, torch.float16))


def test_dequantize_into_writes_every_element_of_a_reused_buffer():
    packed, state = quantize_4bit(weights((9, 77), 6), 64, "nf4", True)
    out = torch.full((9, 77), float("nan"))  # poisoned: an unwritten element would stay NaN
    dequantize_into(packed, state, out)
    assert_bits_equal(out, expected(packed, state, torch.float32))


def test_wrong_output_buffer_and_dtype_are_clear_errors():
    packed, state = quantize_4bit(weights((4, 64), 7), 64, "nf4", False)
    with pytest.raises(QlorakitError, match="cannot dequantize to torch.int32"):
        dequantize_4bit_triton(packed, state, torch.int32)
    with pytest.raises(QlorakitError, match="output must be contiguous with 256 elements"):
        dequantize_into(packed, state, torch.empty(255))
    with pytest.raises(QlorakitError, match="packed weight has 100 bytes, 128 needed"):
        dequantize_into(packed[:100], state, torch.empty(4, 64))
