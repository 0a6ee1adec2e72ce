"""Triton 4-bit quantization (NF4/FP4), bit-identical to `quant.state.quantize_4bit`.

The kernel does the 4-bit pass over the weight: per block of `blocksize` consecutive values of the flattened
tensor, absmax (fp32; a block holding a NaN gets NaN, as torch's amax gives); full blocks multiply by the fp32
reciprocal of max(absmax, 1e-38), the short tail block divides by it (and stores that clamped value, as the
reference does); clamp to [-1, 1]; the code is the sorted position found by counting the fp32 midpoints
strictly below the value (a value on a midpoint takes the lower code; NaN takes the top position, like
torch.bucketize), mapped back through the codebook's sort order; an odd length is padded with the code of 0.0.
Division and reciprocal use `tl.math.div_rn` (IEEE round to nearest), as torch's fp32 division does; no
a*b+c appears, so FP fusion cannot change a result.

Double quantization runs on n/blocksize values, so it stays in torch: the reference `double_quantize` on the
same device, fed the bit-identical absmax (offset = absmax.mean() by the same torch reduction).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..quant.blockwise import check_quantize_args
from ..quant.double_quant import DEFAULT_NESTED_BLOCKSIZE, double_quantize
from ..quant.state import QuantState
from .dispatch import register
from .triton_common import INT32_LIMIT, check_device, code_tables

ELEMENTS_PER_PROGRAM = 4096
NUM_WARPS = 4


@triton.jit
def _code_of(v, valid, mid_ptr, order_ptr):
    """Packed-code index of scaled values `v` (fp32, not yet clamped); 0.0 where `valid` is false (padding)."""
    v = tl.where(valid, v, 0.0)
    is_nan = v != v
    c = tl.minimum(tl.maximum(v, -1.0), 1.0)
    pos = tl.zeros(v.shape, dtype=tl.int32)
    for j in tl.static_range(15):
        pos += (c > tl.load(mid_ptr + j)).to(tl.int32)
    pos = tl.where(is_nan, 15, pos)
    return tl.load(order_ptr + pos)


@triton.jit
def _quantize_kernel(
    x_ptr, packed_ptr, absmax_ptr, mid_ptr, order_ptr,
    n, n_bytes, n_full_blocks, n_blocks,
    BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROGRAM: tl.constexpr, INDEX_64: tl.constexpr,
):
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    blk = pid * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # [blocks, HALF]
    elem = byte[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]  # [blocks, HALF, 2]
    x = tl.load(x_ptr + elem, mask=elem < n, other=0.0).to(tl.float32)
    x_hi, x_lo = tl.split(x)  # elements 2j (high nibble) and 2j+1 (low nibble)

    amax = tl.max(tl.maximum(tl.abs(x_hi), tl.abs(x_lo)), axis=1)
    has_nan = tl.max(((x_hi != x_hi) | (x_lo != x_lo)).to(tl.int32), axis=1) > 0
    nan = tl.full(amax.shape, float("nan"), tl.float32)
    amax = tl.where(has_nan, nan, amax)
    safe = tl.where(has_nan, nan, tl.maximum(amax, tl.full(amax.shape, 1e-38, tl.float32)))
    full = blk < n_full_blocks
    inv = tl.math.div_rn(tl.full(amax.shape, 1.0, tl.float32), safe)
    s_hi = tl.where(full[:, None], x_hi * inv[:, None], tl.math.div_rn(x_hi, safe[:, None]))
    s_lo = tl.where(full[:, None], x_lo * inv[:, None], tl.math.div_rn(x_lo, safe[:, None]))

    q_hi = _code_of(s_hi, byte * 2 < n, mid_ptr, order_ptr)
    q_lo = _code_of(s_lo, byte * 2 + 1 < n, mid_ptr, order_ptr)
    tl.store(packed_ptr + byte, ((q_hi << 4) | q_lo).to(tl.uint8), mask=byte < n_bytes)
    tl.store(absmax_ptr + blk, tl.where(full, amax, safe), mask=blk < n_blocks)


def quantize_blocks_4bit_triton(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `quant.blockwise.quantize_blocks_4bit`: (packed uint8 [(n + 1) // 2, 1], absmax fp32 [n_blocks])."""
    check_quantize_args(x, blocksize, quant_type)
    device = check_device("quantize_4bit", x)
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    n_blocks = math.ceil(n / blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=device)
    tables = code_tables(quant_type, device)
    blocks_per_program = max(1, ELEMENTS_PER_PROGRAM // blocksize)
    grid = (math.ceil(n_blocks / blocks_per_program),)
    _quantize_kernel[grid](
        flat, packed, absmax, tables.midpoints, tables.order,
        n, (n + 1) // 2, n // blocksize, n_blocks,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROGRAM=blocks_per_program, INDEX_64=n + blocksize >= INT32_LIMIT,
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return packed, absmax


@register("quantize_4bit", "triton")
def quantize_4bit_triton(
    x: torch.Tensor, blocksize: int, quant_type: str, double_quant: bool
) -> tuple[torch.Tensor, QuantState]:
    """As `quant.state.quantize_4bit` (nested blocksize 256): (packed uint8 [(numel + 1) // 2, 1], QuantState),
    on x's device."""
    packed, absmax = quantize_blocks_4bit_triton(x, blocksize, quant_type)
    state = QuantState(x.shape, x.dtype, blocksize, quant_type, code_tables(quant_type, x.device).code.clone())
    if double_quant:
        state.nested = double_quantize(absmax, DEFAULT_NESTED_BLOCKSIZE)
    else:
        state.absmax = absmax
    return packed, state
