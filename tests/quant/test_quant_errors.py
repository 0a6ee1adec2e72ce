"""Arguments a user can get wrong raise QuantizationError, saying what was wrong and what is allowed."""

from __future__ import annotations

import re

import pytest
import torch

from qlorakit.errors import QlorakitError, QuantizationError
from qlorakit.quant import quantize_4bit


@pytest.mark.parametrize("blocksize", [48, 16, 8192, 0, -64, 100, 64.0])
def test_bad_blocksize(blocksize):
    with pytest.raises(QuantizationError) as caught:
        quantize_4bit(torch.randn(256), blocksize=blocksize)
    message = str(caught.value)
    assert f"blocksize {blocksize!r}" in message
    assert "power of two from 32 to 4096" in message


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_allowed_blocksize_is_accepted(blocksize):
    packed, state = quantize_4bit(torch.randn(100), blocksize=blocksize)
    assert state.blocksize == blocksize


@pytest.mark.parametrize("quant_type", ["int4", "NF4", "fp8", ""])
def test_bad_quant_type(quant_type):
    with pytest.raises(QuantizationError, match=f"quant_type {quant_type!r} is not supported; allowed: nf4, fp4"):
        quantize_4bit(torch.randn(64), quant_type=quant_type)


@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0)])
def test_empty_tensor(shape):
    expected = f"empty tensor (shape {list(shape)}); it needs >= 1 element"
    with pytest.raises(QuantizationError, match=re.escape(expected)):
        quantize_4bit(torch.empty(shape))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool])
def test_integer_tensor(dtype):
    with pytest.raises(QuantizationError) as caught:
        quantize_4bit(torch.ones(64, dtype=dtype))
    message = str(caught.value)
    assert str(dtype) in message and "floating-point" in message


def test_quantization_errors_are_qlorakit_errors_and_value_errors():
    # The CLI prints QlorakitError as one line; callers that catch ValueError (as for bitsandbytes) still work.
    with pytest.raises(QlorakitError):
        quantize_4bit(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError):
        quantize_4bit(torch.randn(64), quant_type="int4")
