"""Double quantization: the fp32 absmax constants of 4-bit blocks, themselves quantized to 8 bits.

offset = mean(absmax) (fp32); (absmax - offset) is quantized in blocks of `nested_blocksize` (256) against the
signed 8-bit dynamic map with an fp32 absmax per nested block. Dequantized: code8[q] * absmax2 in fp32, then
+ offset as a separate fp32 rounding. This is bitsandbytes' `compress_statistics=True` layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockwise import check_blocksize, dequantize_blocks_8bit, quantize_blocks_8bit
from .codebooks import dynamic_map

DEFAULT_NESTED_BLOCKSIZE = 256


@dataclass
class NestedAbsmax:
    """Absmax constants stored in 8 bits.

    quantized: uint8 [n_blocks]; absmax: fp32 [ceil(n_blocks / blocksize)]; offset: fp32 0-dim tensor;
    code: fp32 [256] (the signed dynamic map), all on one device.
    """

    quantized: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    blocksize: int = DEFAULT_NESTED_BLOCKSIZE

    def dequantize(self) -> torch.Tensor:
        """fp32 [n_blocks]: the absmax constants as the 4-bit dequantizer uses them."""
        return dequantize_blocks_8bit(self.quantized, self.absmax, self.code, self.blocksize) + self.offset

    def to(self, device: torch.device | str) -> "NestedAbsmax":
        return NestedAbsmax(
            self.quantized.to(device), self.absmax.to(device), self.offset.to(device), self.code.to(device),
            self.blocksize,
        )


def double_quantize(absmax: torch.Tensor, blocksize: int = DEFAULT_NESTED_BLOCKSIZE) -> NestedAbsmax:
    """Quantize fp32 absmax constants [n_blocks] to 8 bits (see module docstring)."""
    check_blocksize(blocksize, "nested_blocksize")
    absmax = absmax.to(torch.float32)
    offset = absmax.mean()
    code = dynamic_map(signed=True).to(absmax.device)
    quantized, absmax2 = quantize_blocks_8bit(absmax - offset, code, blocksize)
    return NestedAbsmax(quantized, absmax2, offset, code, blocksize)
