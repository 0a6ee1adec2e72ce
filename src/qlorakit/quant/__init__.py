"""Quantization core: codebooks, the blockwise reference, double quantization, nibble packing, formats."""

from .blockwise import (
    MAX_BLOCKSIZE,
    MIN_BLOCKSIZE,
    dequantize_blocks_4bit,
    dequantize_blocks_8bit,
    quantize_blocks_4bit,
    quantize_blocks_8bit,
)
from .codebooks import NF4_VALUES, QUANT_TYPES, code_4bit, code_int4_symmetric, dynamic_map
from .double_quant import NestedAbsmax, double_quantize
from .packing import pack_nibbles, unpack_nibbles
from .state import QuantState, bits_per_parameter, dequantize_4bit, quantize_4bit

__all__ = [
    "MAX_BLOCKSIZE",
    "MIN_BLOCKSIZE",
    "NF4_VALUES",
    "QUANT_TYPES",
    "NestedAbsmax",
    "QuantState",
    "bits_per_parameter",
    "code_4bit",
    "code_int4_symmetric",
    "dequantize_4bit",
    "dequantize_blocks_4bit",
    "dequantize_blocks_8bit",
    "double_quantize",
    "dynamic_map",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_blocks_4bit",
    "quantize_blocks_8bit",
    "unpack_nibbles",
]
