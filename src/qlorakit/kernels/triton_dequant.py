"""Triton dequantization of packed NF4/FP4 weights, bit-identical to `quant.state.dequantize_4bit`.

out[e] = dtype(code[q[e]] * absmax[e // blocksize]), the product in fp32 rounded once; with nested constants
absmax[b] = fp32(code8[q8[b]] * absmax2[b // nested_blocksize]) then fp32(+ offset), two roundings. Triton's
default compile contracts a*b+c into one FMA (one rounding), so every launch that decodes nested constants
passes `enable_fp_fusion=False` (a compile option of Triton 3.6 and 3.7 alike; the interpreter ignores it and
rounds each operation anyway).

Design (memory-bound: bytes = packed read + absmax read + output write): one program owns
BLOCKS_PER_PROGRAM whole quantization blocks, laid out as a [blocks, blocksize/2] tile of packed bytes (each
thread loads 16 contiguous bytes), decodes the blocks' absmax once per block (nested constants in-kernel, no
fp32 absmax pass through memory), and writes each byte's two values side by side (a join of the high and
low nibble's values; the compiler moves the interleaved tile through shared memory so that every thread stores
contiguous 16-byte vectors). On an H200 this runs at 89-95% of the device-to-device copy bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import QlorakitError
from ..quant.state import QuantState
from .dispatch import register
from .triton_common import INT32_LIMIT, absmax_args, check_device, code_tables, packed_bytes

OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class DequantConfig:
    """Values per program (a multiple of the blocksize; at least one block) and warps per program."""

    elements_per_program: int = 4096
    num_warps: int = 4


# 4096 values = 2 KiB packed in, 8 KiB bf16 out per program (chosen on an H200: docs/kernels.md).
DEQUANT_CONFIG = DequantConfig()


@triton.jit
def load_absmax(blk, mask, absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr,
                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of blocks `blk` (any shape); 0 where `mask` is false."""
    if NESTED:
        q = tl.load(q8_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        a = tl.load(code8_ptr + q) * scale
        a = a + tl.load(offset_ptr)  # a separate rounding: launch with enable_fp_fusion=False
        a = tl.where(mask, a, 0.0)
    else:
        a = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return a


@triton.jit
def _dequantize_kernel(
    packed_ptr, code_ptr, absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, out_ptr,
    n, n_bytes, n_blocks,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr, INDEX_64: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    blk = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    a = load_absmax(blk, blk < n_blocks, absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr,
                    NESTED, NESTED_BLOCKSIZE)

    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [blocks, HALF]; both nibbles share a block
    b = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    hi = (tl.load(code_ptr + (b >> 4)) * a[:, None]).to(out_ptr.dtype.element_ty)  # element 2j
    lo = (tl.load(code_ptr + (b & 15)) * a[:, None]).to(out_ptr.dtype.element_ty)  # element 2j+1
    values = tl.reshape(tl.join(hi, lo), (BLOCKS_PER_PROGRAM, BLOCKSIZE))
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, values, mask=elem < n)


def dequantize_into(
    packed: torch.Tensor, state: QuantState, out: torch.Tensor, config: DequantConfig | None = None
) -> torch.Tensor:
    """Dequantize into `out` (contiguous, state.numel elements, dtype in OUTPUT_DTYPES, on packed's device)."""
    cfg = config or DEQUANT_CONFIG
    n = state.numel
    device = check_device("dequantize_4bit", packed, out)
    if out.dtype not in OUTPUT_DTYPES or not out.is_contiguous() or out.numel() != n:
        raise QlorakitError(
            f"dequantize_4bit: output must be contiguous with {n} elements of "
            f"{', '.join(map(str, OUTPUT_DTYPES))}; got {out.dtype} {list(out.shape)}"
        )
    if n == 0:
        return out
    flat = packed_bytes(packed, n)
    absmax = absmax_args(state, device)
    code = code_tables(state.quant_type, device).code
    blocks_per_program = max(1, cfg.elements_per_program // state.blocksize)
    grid = (math.ceil(state.n_blocks / blocks_per_program),)
    _dequantize_kernel[grid](
        flat, code, *absmax.as_args(), out, n, (n + 1) // 2, state.n_blocks,
        BLOCKSIZE=state.blocksize, BLOCKS_PER_PROGRAM=blocks_per_program, NESTED=absmax.nested,
        NESTED_BLOCKSIZE=absmax.nested_blocksize, INDEX_64=n >= INT32_LIMIT,
        num_warps=cfg.num_warps, enable_fp_fusion=False,
    )
    return out


@register("dequantize_4bit", "triton")
def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [(N*K+1)//2, 1] -> `dtype` tensor of state.shape (a new tensor), bit-identical to the
    reference."""
    if dtype not in OUTPUT_DTYPES:
        raise QlorakitError(
            f"dequantize_4bit: cannot dequantize to {dtype}; allowed: {', '.join(map(str, OUTPUT_DTYPES))}"
        )
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    return dequantize_into(packed, state, out)
