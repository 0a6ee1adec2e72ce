"""The Triton 4-bit quantizer against the reference `quant.state.quantize_4bit`, bit for bit.

Specification: per block of the flattened tensor, full blocks multiply by the fp32 reciprocal of the absmax and the
short tail block divides (storing its absmax clamped to 1e-38); clamp to [-1, 1]; nearest code by the fp32
midpoints, a value on a midpoint taking the lower code; NaN takes the top code and makes its block's absmax NaN,
as torch does; odd lengths padded with the code of 0.0. With double quantization the 8-bit step is the reference's
own code on the kernel's (identical) absmax, so the whole state must match: packed bytes, absmax or its 8-bit
codes, nested absmax and offset. Runs in Triton's interpreter (no bf16 arithmetic happens here: inputs are
converted to fp32 first, exactly).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from qlorakit.errors import QuantizationError
from qlorakit.kernels.triton_common import code_tables
from qlorakit.kernels.triton_quant import quantize_4bit_triton
from qlorakit.quant.state import QuantState, quantize_4bit


def same_float_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def assert_same_quantization(x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool) -> None:
    packed, state = quantize_4bit_triton(x, blocksize, quant_type, double_quant)
    ref_packed, ref_state = quantize_4bit(x, blocksize, quant_type, double_quant)
    assert packed.shape == ref_packed.shape and packed.dtype == torch.uint8
    mismatch = (packed != ref_packed).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} packed bytes differ, first at byte {mismatch[0, 0].item()}"
    assert isinstance(state, QuantState)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == (
        ref_state.shape, ref_state.dtype, ref_state.blocksize, ref_state.quant_type)
    assert torch.equal(state.code, ref_state.code)
    if double_quant:
        n, r = state.nested, ref_state.nested
        assert state.absmax is None and n is not None
        assert torch.equal(n.quantized, r.quantized)
        assert same_float_bits(n.absmax, r.absmax) and same_float_bits(n.offset, r.offset)
        assert torch.equal(n.code, r.code) and n.blocksize == r.blocksize
    else:
        assert state.nested is None
        assert same_float_bits(state.absmax, ref_state.absmax)


def weights(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_fresh_random_weights_quantize_identically(quant_type, double_quant, dtype):
    for seed in range(2):
        assert_same_quantization(weights((40, 192), seed, dtype), 64, quant_type, double_quant)


@pytest.mark.parametrize(
    "shape, blocksize",
    [
        pytest.param((37, 67), 64, id="odd-numel-padding-nibble-and-short-tail"),
        pytest.param((1, 33), 32, id="one-row-tail-of-one"),
        pytest.param((5,), 64, id="less-than-a-block"),
        pytest.param((1,), 32, id="a-single-value"),
        pytest.param((2, 4096), 4096, id="blocksize-4096"),
        pytest.param((3, 1000), 256, id="tail-of-232"),
    ],
)
def test_edge_shapes_quantize_identically(shape, blocksize):
    for quant_type, double_quant in (("nf4", True), ("fp4", False)):
        assert_same_quantization(weights(shape, 1), blocksize, quant_type, double_quant)


def test_all_zero_blocks_full_and_tail():
    x = weights((4, 100), 2)
    x[0] = 0.0  # full all-zero blocks: absmax 0, codes of 0.0
    x.view(-1)[-16:] = 0.0  # the short tail block (400 % 64 = 16 values) is all zero: absmax stored as 1e-38
    x[2, 10:74] = 0.0
    for quant_type in ("nf4", "fp4"):
        for double_quant in (True, False):
            assert_same_quantization(x, 64, quant_type, double_quant)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_values_exactly_on_a_midpoint_take_the_lower_code(quant_type):
    mid = code_tables(quant_type, torch.device("cpu")).midpoints
    full_block = torch.cat([torch.ones(1), mid, -mid, mid * 0.999999, torch.zeros(64 - 1 - 3 * 15)])
    assert_same_quantization(full_block, 64, quant_type, False)  # scaled by the reciprocal of 1.0: exact ties
    assert_same_quantization(torch.cat([torch.ones(1), mid]), 64, quant_type, False)  # a short block divides


def test_tiny_huge_and_non_finite_values():
    x = weights((3, 128), 3)
    x[0, :64] = 1e-30
    x[0, 64:] *= 1e30
    x[1, 5] = float("inf")
    x[1, 70] = float("-inf")
    x[2, 3] = float("nan")  # a NaN block: absmax NaN, every code the top one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the interpreter's numpy sees inf * 0 and NaN compares
        for quant_type in ("nf4", "fp4"):
            packed, state = quantize_4bit_triton(x, 64, quant_type, False)
            ref_packed, ref_state = quantize_4bit(x, 64, quant_type, False)
            assert torch.equal(packed, ref_packed)
            assert torch.equal(state.absmax.isnan(), ref_state.absmax.isnan())
            assert torch.equal(state.absmax.nan_to_num(), ref_state.absmax.nan_to_num())


def test_non_contiguous_input_is_quantized_in_logical_order():
    x = weights((64, 48), 4).t()
    assert not x.is_contiguous()
    assert_same_quantization(x, 32, "nf4", True)


def test_bad_arguments_raise_the_reference_errors():
    with pytest.raises(QuantizationError, match="blocksize 48 is not allowed"):
        quantize_4bit_triton(torch.randn(64), 48, "nf4", False)
    with pytest.raises(QuantizationError, match="quant_type 'int4' is not supported"):
        quantize_4bit_triton(torch.randn(64), 64, "int4", False)
    with pytest.raises(QuantizationError, match="can only quantize floating-point tensors"):
        quantize_4bit_triton(torch.ones(64, dtype=torch.int32), 64, "nf4", False)
    with pytest.raises(QuantizationError, match="cannot quantize an empty tensor"):
        quantize_4bit_triton(torch.empty(0, 8), 64, "nf4", False)
