"""Double quantization: the fp32 absmax constants stored as 8-bit dynamic codes around their mean."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qlorakit.errors import QuantizationError
from qlorakit.nn.linear4bit import Linear4bit
from qlorakit.quant import bits_per_parameter, double_quantize, dynamic_map, quantize_blocks_4bit

# Worst-case distance from a value in [-1, 1] to the nearest entry of the signed dynamic map: half the widest gap
# between neighbouring entries (0.0140625 / 2, in the 0.1..1 decade with 6 fraction bits), or the distance from -1
# to the lowest entry (-0.99297), whichever is larger. Computed from the map rather than written down.
_MAP = dynamic_map(signed=True)
HALF_WIDEST_GAP = max((_MAP[1:] - _MAP[:-1]).max().item() / 2, _MAP[0].item() + 1.0)
GRID_HALF_STEP = 1.0 / 65535  # bitsandbytes' CPU path first snaps the scaled value to a 65536-point grid


def absmax_of(x: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    return quantize_blocks_4bit(x, blocksize, "nf4")[1]


@settings(max_examples=40, deadline=None)
@given(
    n_blocks=st.integers(1, 1500),
    scale=st.floats(1e-20, 1e20),
    spread=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_dequantized_absmax_is_within_the_8bit_bound(n_blocks, scale, spread, seed):
    # Any positive constants, from nearly equal (spread 0) to spanning orders of magnitude (spread 3).
    g = torch.Generator().manual_seed(seed)
    absmax = scale * torch.exp(spread * torch.randn(n_blocks, generator=g))
    nested = double_quantize(absmax)
    restored = nested.dequantize()
    # Per element: |code8[q] - (a - offset) / absmax2| <= HALF_WIDEST_GAP + GRID_HALF_STEP, so after multiplying
    # back by the nested block's absmax2, the error is at most that times absmax2 (plus fp32 rounding of the
    # product and of "+ offset", a few ulps of the larger of a and offset).
    absmax2 = nested.absmax.repeat_interleave(256)[:n_blocks]
    rounding = 4 * torch.finfo(torch.float32).eps * torch.maximum(absmax, nested.offset.abs())
    bound = (HALF_WIDEST_GAP + GRID_HALF_STEP) * absmax2 + rounding
    assert torch.all((restored - absmax).abs() <= bound)


def test_relative_error_of_the_absmax_on_normal_weights():
    # N(0,1) weights, blocksize 64: absmax in about [1.4, 4.8], offset ~2.6, nested absmax up to ~2.2, so the bound
    # above is at most 0.00705 * 2.2 / 1.4 ~ 1.1% of an absmax. Measured (seed 0, 2^20 weights): max 0.82%,
    # mean 0.16%. Assert 1% and 0.25%.
    x = torch.randn(2**20, generator=torch.Generator().manual_seed(0))
    absmax = absmax_of(x)
    relative = (double_quantize(absmax).dequantize() - absmax).abs() / absmax
    assert relative.max().item() < 0.01
    assert relative.mean().item() < 0.0025


@pytest.mark.parametrize("n_blocks", [1, 255, 256, 257, 1000])
def test_nested_shapes_and_dtypes(n_blocks):
    absmax = torch.rand(n_blocks, generator=torch.Generator().manual_seed(n_blocks)) + 0.5
    nested = double_quantize(absmax)
    assert nested.quantized.dtype == torch.uint8 and nested.quantized.shape == (n_blocks,)
    assert nested.absmax.dtype == torch.float32 and nested.absmax.shape == (math.ceil(n_blocks / 256),)
    assert nested.offset.dtype == torch.float32 and nested.offset.shape == ()
    assert torch.equal(nested.code, dynamic_map(signed=True))
    assert nested.blocksize == 256
    assert nested.offset.item() == absmax.mean().item()
    assert nested.dequantize().shape == (n_blocks,)


def test_other_nested_blocksize():
    absmax = torch.rand(300) + 0.5
    nested = double_quantize(absmax, blocksize=128)
    assert nested.blocksize == 128 and nested.absmax.shape == (3,)


@pytest.mark.parametrize("bad", [100, 16, 8192])
def test_bad_nested_blocksize_is_refused(bad):
    with pytest.raises(QuantizationError, match=f"nested_blocksize {bad}.*power of two from 32 to 4096"):
        double_quantize(torch.rand(10), blocksize=bad)


def test_bits_per_parameter():
    # 4 bits of code + 8 bits per 64 weights + 32 bits per 64 * 256 weights = 4.126953125 (the QLoRA paper's 4.127).
    assert bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=0.001)
    assert bits_per_parameter(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert bits_per_parameter(64, double_quant=False) == 4.5
    assert bits_per_parameter(128, double_quant=False) == 4.25
    assert bits_per_parameter(32, double_quant=True) > bits_per_parameter(64, double_quant=True)


def test_linear4bit_storage_approaches_bits_per_parameter():
    # A layer's own count adds the per-layer constants (one offset, a partial nested block), which a large layer
    # amortises: 1024 x 1024 is within 1e-4 of the formula, a small one further away.
    torch.manual_seed(0)
    expected = bits_per_parameter(64, double_quant=True)
    large = Linear4bit.from_linear(nn.Linear(1024, 1024), 64, "nf4", double_quant=True).bits_per_parameter()
    small = Linear4bit.from_linear(nn.Linear(100, 30), 64, "nf4", double_quant=True).bits_per_parameter()
    assert abs(large - expected) < 1e-4
    assert abs(small - expected) > abs(large - expected)
    plain = Linear4bit.from_linear(nn.Linear(256, 64), 64, "nf4", double_quant=False).bits_per_parameter()
    assert plain == bits_per_parameter(64, double_quant=False) == 4.5
