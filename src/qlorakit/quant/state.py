"""A 4-bit tensor's quantization state, and the one-call quantize / dequantize that the rest of qlorakit uses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise import dequantize_blocks_4bit, quantize_blocks_4bit
from .codebooks import code_4bit
from .double_quant import DEFAULT_NESTED_BLOCKSIZE, NestedAbsmax, double_quantize


@dataclass
class QuantState:
    """Everything needed to dequantize a packed 4-bit tensor.

    shape/dtype: the original tensor's; code: fp32 [16] codebook of quant_type; absmax: fp32 [n_blocks] when
    not nested, else None and `nested` holds the 8-bit constants.
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    absmax: torch.Tensor | None = None
    nested: NestedAbsmax | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)

    def absmax_fp32(self) -> torch.Tensor:
        """fp32 [n_blocks], dequantizing the nested constants when there are any."""
        if self.nested is not None:
            return self.nested.dequantize()
        assert self.absmax is not None
        return self.absmax

    def to(self, device: torch.device | str) -> "QuantState":
        return QuantState(
            self.shape, self.dtype, self.blocksize, self.quant_type, self.code.to(device),
            None if self.absmax is None else self.absmax.to(device),
            None if self.nested is None else self.nested.to(device),
        )


def quantize_4bit(
    x: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = True,
    nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize a float tensor (any shape, any device) to packed 4 bits.

    Returns (packed uint8 [(numel + 1) // 2, 1], QuantState) on x's device.
    """
    packed, absmax = quantize_blocks_4bit(x, blocksize, quant_type)
    state = QuantState(x.shape, x.dtype, blocksize, quant_type, code_4bit(quant_type, x.device))
    if double_quant:
        state.nested = double_quantize(absmax, nested_blocksize)
    else:
        state.absmax = absmax
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The reference dequantizer: `dtype` (default: the original dtype) tensor of state.shape."""
    return dequantize_blocks_4bit(
        packed, state.absmax_fp32(), state.shape, state.blocksize, state.quant_type, dtype or state.dtype
    )


def bits_per_parameter(
    blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = DEFAULT_NESTED_BLOCKSIZE
) -> float:
    """Storage per weight in bits, amortised over large tensors: 4 bits of code plus the absmax constants.

    Without double quantization each block carries an fp32 absmax (32 / blocksize bits per weight); with it, an
    8-bit constant per block plus an fp32 absmax per `nested_blocksize` blocks. NF4 + DQ at 64: ~4.127.
    """
    if double_quant:
        return 4.0 + 8.0 / blocksize + 32.0 / (blocksize * nested_blocksize)
    return 4.0 + 32.0 / blocksize
