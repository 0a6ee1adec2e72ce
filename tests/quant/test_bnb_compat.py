"""The reference quantizer against bitsandbytes' CPU path, byte for byte.

For NF4 and FP4, with and without double quantization, every output must be identical to what
`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit` produce on the CPU: the packed bytes, the fp32 absmax
(or its 8-bit codes, the nested fp32 absmax, the offset and the nested code) and the dequantized tensor in each
output dtype. Floats are compared bit for bit, so 0.0 and -0.0 differ (one exception: the dequantized FP4 zero,
see test_fp4_sign_of_zero_in_bitsandbytes) and NaNs must sit at the same places.
"""

from __future__ import annotations

import math

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qlorakit.quant import code_4bit, dequantize_4bit, quantize_4bit, unpack_nibbles

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_identical(what: str, ours: torch.Tensor, theirs: torch.Tensor, zero_sign: bool = True) -> None:
    """Same dtype, same number of elements, same bits (shapes are compared by the callers that care).

    NaNs must sit at the same places (their payload bits do not count); zero_sign=False also lets 0.0 and -0.0
    count as equal (see test_fp4_sign_of_zero_in_bitsandbytes).
    """
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != bitsandbytes' {theirs.dtype}"
    assert ours.numel() == theirs.numel(), f"{what}: {ours.numel()} elements != bitsandbytes' {theirs.numel()}"
    a, b = ours.reshape(-1), theirs.reshape(-1)
    if a.is_floating_point():
        assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaNs at different places"
        a, b = torch.where(a.isnan(), 0.0, a), torch.where(b.isnan(), 0.0, b)
        if not zero_sign:
            a, b = torch.where(a == 0, 0.0, a), torch.where(b == 0, 0.0, b)
        a, b = a.view(_SAME_WIDTH_INT[a.dtype]), b.view(_SAME_WIDTH_INT[b.dtype])
    differ = (a != b).nonzero().flatten()
    assert differ.numel() == 0, (
        f"{what}: {differ.numel()} of {a.numel()} differ, first at {differ[0].item()}: "
        f"ours {ours.reshape(-1)[differ[0]].item()!r}, bitsandbytes {theirs.reshape(-1)[differ[0]].item()!r}"
    )


def assert_matches_bitsandbytes(x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool):
    """Quantize `x` both ways, compare every stored tensor and the dequantized values in each output dtype.

    Returns our (packed, state) for further checks.
    """
    packed, state = quantize_4bit(x, blocksize, quant_type, double_quant)
    ref_packed, ref_state = bnbf.quantize_4bit(
        x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    assert packed.shape == ref_packed.shape == ((x.numel() + 1) // 2, 1)
    assert_identical("packed codes", packed, ref_packed)
    assert_identical("codebook", state.code, ref_state.code)
    if double_quant:
        assert state.absmax is None and ref_state.nested
        assert_identical("8-bit absmax", state.nested.quantized, ref_state.absmax)
        assert_identical("nested absmax", state.nested.absmax, ref_state.state2.absmax)
        assert_identical("offset", state.nested.offset.reshape(1), ref_state.offset.reshape(1))
        assert_identical("nested code", state.nested.code, ref_state.state2.code)
        assert state.nested.blocksize == ref_state.state2.blocksize == 256
    else:
        assert_identical("absmax", state.absmax, ref_state.absmax)
    for out_dtype in FLOAT_DTYPES:
        ours = dequantize_4bit(packed, state, out_dtype)
        ref_state.dtype = out_dtype
        assert ours.shape == x.shape and ours.dtype == out_dtype
        # bitsandbytes returns [1, n] for 1-D input (and transposes when it has a single packed byte): compare flat.
        # Its two CPU dequantizers disagree on the sign of FP4's zero code 8, so zeros compare as numbers.
        assert_identical(f"dequantized {out_dtype}", ours, bnb_generic_dequantize(ref_packed, ref_state),
                         zero_sign=quant_type != "fp4")
        if native_dequantize_follows_the_layout(x.shape, blocksize):
            assert_identical(f"dequantized {out_dtype} (native)", ours, bnbf.dequantize_4bit(ref_packed, ref_state),
                             zero_sign=quant_type != "fp4")
    return packed, state


def bnb_generic_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes' plain-PyTorch 4-bit dequantizer (its `default` backend, which its CPU backend also calls for
    odd row lengths and blocks of 2048+ on AVX512 CPUs): the same arithmetic on every CPU."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax, code, state.blocksize,
                                    list(state.shape), state.dtype)


def native_dequantize_follows_the_layout(shape, blocksize: int) -> bool:
    """bitsandbytes' native CPU dequantizer (libbitsandbytes_cpu, AVX512 builds) indexes absmax per row: with
    several rows whose length is not a multiple of the block size, blocks that span two rows get the wrong
    absmax (seen on an AVX512-BF16/AMX CPU: [3, 96] at blocksize 64, 116 of 288 values), while its quantizer
    and CUDA path run blocks over the flattened tensor. It is compared where the two layouts agree."""
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return rows == 1 or shape[-1] % blocksize == 0


def random_tensor(shape, dtype, scale: float, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        x = torch.randn(shape, generator=g)
    elif kind == "uniform":
        x = torch.rand(shape, generator=g) * 2 - 1
    elif kind == "heavy_tailed":  # ratio of normals: Cauchy-like outliers dominate some blocks
        x = torch.randn(shape, generator=g) / (torch.rand(shape, generator=g) + 0.05)
    else:  # sparse: mostly exact zeros, so small blocks are often all zero
        x = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.05)
    return (x * scale).to(dtype)


@st.composite
def quantization_cases(draw):
    quant_type = draw(st.sampled_from(QUANT_TYPES))
    double_quant = draw(st.booleans())
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    if draw(st.booleans()):
        # 1-D: whole blocks plus a tail of any length (odd lengths included); up to ~600 blocks for small blocksizes
        # so that double quantization gets several nested blocks of 256.
        full = draw(st.integers(0, max(3, 20_000 // blocksize)))
        tail = draw(st.integers(0 if full else 1, blocksize - 1))
        shape = (full * blocksize + tail,)
    else:
        shape = (draw(st.integers(1, 48)), draw(st.integers(1, 700)))
    # Scales from tiny to huge, within what the dtype holds (float16 tops out at 65504).
    exponent = draw(st.floats(-4, 4) if dtype == torch.float16 else st.floats(-30, 30))
    kind = draw(st.sampled_from(["normal", "uniform", "heavy_tailed", "sparse"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_tensor(shape, dtype, 10.0**exponent, kind, seed), blocksize, quant_type, double_quant


@settings(max_examples=60, deadline=None)
@given(quantization_cases())
def test_random_tensors_match_bitsandbytes(case):
    x, blocksize, quant_type, double_quant = case
    assert_matches_bitsandbytes(x, blocksize, quant_type, double_quant)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_every_blocksize_dtype_and_format_matches_bitsandbytes(blocksize, dtype, quant_type, double_quant):
    # Three whole blocks and an odd tail.
    x = random_tensor((3 * blocksize + 5,), dtype, 1.0, "normal", seed=blocksize)
    assert_matches_bitsandbytes(x, blocksize, quant_type, double_quant)


# ---------------------------------------------------------------------------------------------------------------
# Named edge cases
# ---------------------------------------------------------------------------------------------------------------


def sorted_code_midpoints(quant_type: str) -> torch.Tensor:
    ordered = code_4bit(quant_type).sort().values
    return (ordered[:-1] + ordered[1:]) / 2


@pytest.mark.parametrize("absmax", [1.0, 3.7, 1e-30, 1e30])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_values_exactly_on_code_midpoints(quant_type, absmax):
    # Each block holds its absmax and values at (and one ulp either side of) every midpoint between neighbouring
    # codes, times the absmax. With absmax 1.0 the scaled value is the midpoint itself: a tie, which goes to the
    # lower code. The first block is whole (scaled by the fp32 reciprocal), the second a tail (divided).
    mids = sorted_code_midpoints(quant_type)
    up, down = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    values = torch.cat([torch.tensor([absmax]), mids * absmax, -mids * absmax, up * absmax, down * absmax])
    assert values.numel() == 61
    x = torch.cat([values, torch.zeros(3), values])
    packed, state = assert_matches_bitsandbytes(x, 64, quant_type, double_quant=False)
    if absmax == 1.0:
        dequantized = dequantize_4bit(packed, state)
        lower_codes = code_4bit(quant_type).sort().values[:-1]
        for start in (1, 65):
            at_mids = dequantized[start : start + mids.numel()]
            assert torch.equal(at_mids, lower_codes), "a value on a midpoint takes the lower of the two codes"


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_all_zero_blocks(quant_type, double_quant):
    # bitsandbytes' CPU path maps an all-zero block to the code of 0.0 (0x7 per nibble for NF4, 0x0 for FP4);
    # its CUDA kernel stores 0x0 for NF4 instead (code 0 is -1.0, harmless since the absmax is 0). We match the
    # CPU path. A whole zero block stores absmax 0; a zero tail block stores the 1e-38 floor of its divisor.
    x = torch.zeros(64 * 3 + 36)
    x[64:128] = torch.randn(64)
    packed, state = assert_matches_bitsandbytes(x, 64, quant_type, double_quant)
    zero_byte = 0x77 if quant_type == "nf4" else 0x00
    flat = packed.reshape(-1)
    assert torch.all(flat[:32] == zero_byte) and torch.all(flat[64:] == zero_byte)
    if not double_quant:
        assert state.absmax[0].item() == 0.0 and state.absmax[2].item() == 0.0
        assert state.absmax[3].item() == pytest.approx(1e-38)
    assert torch.equal(dequantize_4bit(packed, state)[128:], torch.zeros(100))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_all_zero_tensor(quant_type):
    for double_quant in (False, True):
        assert_matches_bitsandbytes(torch.zeros(256), 64, quant_type, double_quant)
        assert_matches_bitsandbytes(torch.zeros(7, 9), 32, quant_type, double_quant)


@pytest.mark.parametrize("length", [1, 2, 3, 31, 33, 65, 4095, 4097])
@pytest.mark.parametrize("blocksize", [32, 4096])
def test_lengths_that_are_odd_or_not_a_multiple_of_the_blocksize(length, blocksize):
    x = random_tensor((length,), torch.float32, 1.0, "normal", seed=length)
    for quant_type in QUANT_TYPES:
        for double_quant in (False, True):
            packed, state = assert_matches_bitsandbytes(x, blocksize, quant_type, double_quant)
            assert state.n_blocks == math.ceil(length / blocksize)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_length_one(quant_type):
    x = torch.tensor([-0.75])
    packed, state = assert_matches_bitsandbytes(x, 64, quant_type, double_quant=False)
    # The single value is its own absmax: it becomes -1.0 exactly; the padding nibble holds the code of 0.0.
    assert dequantize_4bit(packed, state).item() == -0.75
    assert packed.reshape(-1)[0].item() & 0xF == (7 if quant_type == "nf4" else 0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 50), (33, 17), (2, 3, 5), (64, 64)])
def test_one_two_and_three_dimensional_shapes(shape):
    # Blocks run over the flattened row-major tensor, across row boundaries, never per row.
    x = random_tensor(shape, torch.bfloat16, 1.0, "normal", seed=sum(shape))
    for quant_type in QUANT_TYPES:
        for double_quant in (False, True):
            assert_matches_bitsandbytes(x, 32, quant_type, double_quant)


@pytest.mark.parametrize("scale", [1e-30, 1e30], ids=["tiny", "huge"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_huge_and_tiny_magnitudes(quant_type, scale):
    x = random_tensor((1000,), torch.float32, scale, "normal", seed=7)
    for double_quant in (False, True):
        packed, state = assert_matches_bitsandbytes(x, 64, quant_type, double_quant)
        error = (dequantize_4bit(packed, state) - x).abs().max().item()
        assert error <= 0.4 * x.abs().max().item()


@pytest.mark.parametrize("constant", [1.0, 0.125, 0.1, 3.0e-20])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_equal_absmax_everywhere_gives_a_nested_block_of_zeros(quant_type, constant):
    # +-constant everywhere: every absmax equals the constant, so does their mean when the sum is exact (powers
    # of two), and absmax - offset is a block of zeros: 8-bit code 0 with nested absmax 0. (For 0.1 the mean
    # may round, leaving tiny non-zero differences; bitsandbytes must still be matched.)
    signs = torch.randn(64 * 300, generator=torch.Generator().manual_seed(3)).sign()
    x = signs * constant
    packed, state = assert_matches_bitsandbytes(x, 64, quant_type, double_quant=True)
    nested = state.nested
    assert nested.absmax.shape == (2,)
    if constant in (1.0, 0.125):
        assert nested.offset.item() == constant
        assert torch.all(nested.quantized == 0) and torch.all(nested.absmax == 0)
        assert torch.equal(nested.dequantize(), torch.full((300,), constant))
        assert torch.equal(dequantize_4bit(packed, state), x)


def test_many_nested_blocks_with_a_short_last_one():
    # 529 absmax constants: two whole nested blocks of 256 and a tail of 17.
    x = random_tensor((32 * 529 - 3,), torch.float32, 0.02, "heavy_tailed", seed=11)
    for quant_type in QUANT_TYPES:
        packed, state = assert_matches_bitsandbytes(x, 32, quant_type, double_quant=True)
        assert state.nested.quantized.shape == (529,) and state.nested.absmax.shape == (3,)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_small_values_next_to_zero(quant_type):
    # FP4 has two codes holding 0.0 (0 and 8): on the CPU, bitsandbytes gives a value in (0, midpoint) code 8 and
    # 0.0 or a value in (-midpoint, 0) code 0. Signed zeros are included; all must match.
    x = torch.tensor([1.0, 0.0, -0.0, 1e-4, -1e-4, 1e-3, -1e-3, 2e-3, -2e-3, 1e-30, -1e-30, 0.5])
    packed, _ = assert_matches_bitsandbytes(x, 32, quant_type, double_quant=False)
    codes = unpack_nibbles(packed, x.numel()).tolist()
    if quant_type == "fp4":
        assert codes[1:11] == [0, 0, 8, 0, 8, 0, 8, 0, 8, 0]
    else:
        assert codes[1:11] == [7] * 10


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_non_finite_values_are_quantized_like_bitsandbytes(quant_type):
    # Not a supported input, but neither may crash: an inf or NaN weight poisons its block (absmax inf or NaN),
    # and under double quantization the offset; the 8-bit quantizer skips NaNs and stores index 0 for them.
    inf, nan = float("inf"), float("nan")
    for values in ([1.0, inf, 2.0, -3.0], [1.0, nan, 2.0, -3.0], [-inf, 0.5]):
        x = torch.cat([torch.tensor(values), torch.randn(300)])
        for double_quant in (False, True):
            assert_matches_bitsandbytes(x, 64, quant_type, double_quant)


def test_subnormal_absmax_constants_under_double_quantization():
    # Absmax constants of 1, 3 and 2 times the smallest subnormal: their mean is exactly 2 of them, the nested
    # absmax is 1 of them and its fp32 reciprocal overflows to inf, so 0 * inf = NaN appears while scaling.
    tiny = torch.tensor(1.4e-45)
    x = torch.cat([torch.full((64,), 1.0) * tiny, torch.full((64,), 3.0) * tiny, torch.full((64,), 2.0) * tiny])
    assert_matches_bitsandbytes(x, 64, "nf4", double_quant=True)


def test_fp4_sign_of_zero_in_bitsandbytes():
    # FP4 code 8 is "negative zero". bitsandbytes' table (get_4bit_type) holds +0.0 there, and so does ours, but
    # its native CPU dequantizer (taken when the last dimension is even) decodes the sign bit and returns -0.0,
    # while its PyTorch fallback (odd last dimension) reads the table and returns +0.0. We follow the table in
    # both cases; the values are equal as numbers, and nothing downstream can tell them apart except signbit.
    x = torch.tensor([[1.0, 1e-3, 0.5, 1e-3], [1.0, 1e-3, 0.5, 1e-3]])
    packed, state = quantize_4bit(x, 32, "fp4", double_quant=False)
    assert packed.reshape(-1)[0].item() & 0xF == 8
    ours = dequantize_4bit(packed, state)
    ref_packed, ref_state = bnbf.quantize_4bit(x, blocksize=32, quant_type="fp4")
    native = bnbf.dequantize_4bit(ref_packed, ref_state)
    assert ours[0, 1].item() == native[0, 1].item() == 0.0
    assert not torch.signbit(ours[0, 1])
    assert torch.signbit(native[0, 1]), "bitsandbytes' native kernel now gives +0.0: compare zero signs again"
    odd = x[:, :3].contiguous()
    ref_packed, ref_state = bnbf.quantize_4bit(odd, blocksize=32, quant_type="fp4")
    assert not torch.signbit(bnbf.dequantize_4bit(ref_packed, ref_state)[0, 1])
