"""Blockwise absmax quantization over the flattened row-major tensor: the plain-PyTorch reference.

This module is the specification every faster path (Triton kernels) is tested against. It runs on any
device. Rounding follows bitsandbytes' CPU path exactly, so bytes are interchangeable with it:

* 4-bit: each block of `blocksize` consecutive elements (the last block may be shorter) is scaled by its fp32
  absmax (full blocks multiply by the fp32 reciprocal, the short tail block divides), clamped to [-1, 1] and
  mapped to the nearest code by comparing with the fp32 midpoints between neighbouring sorted codes; a value
  exactly on a midpoint goes to the lower code. An all-zero block has absmax 0 and codes of 0.0.
* 8-bit (used for double quantization and 8-bit optimizer states): x times the fp32 reciprocal absmax, snapped
  to a 65536-point grid over [-1, 1], then the map entry nearest that grid point; an all-zero block stores 0.
* Dequantize: dtype(code[q] * absmax), the product in fp32, rounded once.
"""

from __future__ import annotations

import math

import torch

from ..errors import QuantizationError
from .codebooks import QUANT_TYPES, code_4bit
from .packing import pack_nibbles

MIN_BLOCKSIZE = 32
MAX_BLOCKSIZE = 4096


def check_blocksize(blocksize: int, what: str = "blocksize") -> None:
    """Allowed blocksizes: powers of two from 32 to 4096."""
    if (
        not isinstance(blocksize, int)
        or blocksize < MIN_BLOCKSIZE
        or blocksize > MAX_BLOCKSIZE
        or blocksize & (blocksize - 1)
    ):
        raise QuantizationError(
            f"{what} {blocksize!r} is not allowed; use a power of two from {MIN_BLOCKSIZE} to {MAX_BLOCKSIZE}"
        )


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise QuantizationError(f"quant_type {quant_type!r} is not supported; allowed: {', '.join(QUANT_TYPES)}")


def check_quantize_args(x: torch.Tensor, blocksize: int, quant_type: str) -> None:
    """What every 4-bit quantizer (reference or kernel) accepts: a non-empty float tensor, a known format."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if not x.is_floating_point():
        raise QuantizationError(f"can only quantize floating-point tensors, got {x.dtype}")
    if x.numel() == 0:
        raise QuantizationError(f"cannot quantize an empty tensor (shape {list(x.shape)}); it needs >= 1 element")


def num_blocks(n: int, blocksize: int) -> int:
    return math.ceil(n / blocksize)


def scale_into_unit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [n] -> (scaled fp32 [n] in [-1, 1], absmax fp32 [num_blocks])."""
    n = flat.numel()
    full = (n // blocksize) * blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)
    scaled = (head * inv[:, None]).clamp(-1.0, 1.0).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat((absmax, tail_max.reshape(1)))
        scaled = torch.cat((scaled, (flat[full:] / tail_max).clamp(-1.0, 1.0)))
    return scaled, absmax


def nearest_code_by_midpoints(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into `code` (fp32, any order, may hold -0.0 and 0.0) nearest to each value; ties go to the lower
    code value. Returns int64, same shape as `scaled`."""
    order = torch.argsort(code, stable=True)
    ordered = code[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


def quantize_blocks_4bit(
    x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize any float tensor to packed 4-bit codes.

    Returns (packed uint8 [(n + 1) // 2, 1], absmax fp32 [ceil(n / blocksize)]), on x's device.
    """
    check_quantize_args(x, blocksize, quant_type)
    flat = x.reshape(-1).to(torch.float32)
    scaled, absmax = scale_into_unit(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = nearest_code_by_midpoints(scaled, code_4bit(quant_type, scaled.device))
    return pack_nibbles(codes).unsqueeze(1), absmax


_pair_tables: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """fp32 [256, 2]: the two code values packed in each possible byte (high nibble first)."""
    key = (quant_type, device)
    if key not in _pair_tables:
        code = code_4bit(quant_type, device)
        byte = torch.arange(256, device=device)
        _pair_tables[key] = torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1)
    return _pair_tables[key]


def dequantize_blocks_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of quantize_blocks_4bit: dtype(code[q] * absmax) with the product in fp32.

    packed: uint8 holding >= ceil(n/2) bytes; absmax: fp32 [ceil(n / blocksize)]. Returns `dtype` of `shape`.
    """
    n = math.prod(shape)
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    values = _pair_table(quant_type, flat.device)[flat[: (n + 1) // 2].int()].reshape(-1)[:n]
    scale = absmax.to(torch.float32)
    nb = num_blocks(n, blocksize)
    if n == nb * blocksize:
        out = values.view(nb, blocksize) * scale[:, None]
    else:
        out = torch.nn.functional.pad(values, (0, nb * blocksize - n)).view(nb, blocksize) * scale[:, None]
    return out.reshape(-1)[:n].to(dtype).reshape(shape)


_LUT_SIZE = 65536


def _grid_to_code_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [65536]: for each point of a uniform grid over [-1, 1], the index of the nearest code entry
    (nearest by fp32 midpoints; a grid point exactly on a midpoint takes the lower entry)."""
    steps = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    grid = -1.0 + (2.0 * steps) / float(_LUT_SIZE - 1)
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.bucketize(grid, midpoints)


def quantize_blocks_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization against a sorted 256-entry map (e.g. the dynamic map).

    Each value is scaled by its block's fp32 reciprocal absmax, snapped to a 65536-point grid over [-1, 1]
    (round half up) and mapped to the map entry nearest that grid point, as bitsandbytes' CPU path does.
    An all-zero block stores index 0; NaNs are skipped by the absmax and store index 0.
    x: float, any shape. Returns (uint8 codes of x's shape, absmax fp32 [ceil(n / blocksize)]).
    """
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = num_blocks(n, blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    magnitude = padded.abs()
    # As in bitsandbytes' CPU kernel: a NaN does not count towards its block's absmax, and a value that is NaN
    # after scaling (a NaN input, inf * 0, or 0 * inf under a subnormal absmax) takes grid point 0, i.e. index 0.
    absmax = torch.where(magnitude.isnan(), 0.0, magnitude).amax(dim=1)
    inv = torch.where(absmax == 0, 0.0, 1.0 / absmax)
    normed = (padded * inv[:, None]).clamp(-1.0, 1.0)
    normed = torch.where(normed.isnan(), -1.0, normed)
    grid_index = ((normed + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    table = _grid_to_code_table(code.to(device=flat.device, dtype=torch.float32))
    idx = torch.where(absmax[:, None] == 0, 0, table[grid_index])
    return idx.reshape(-1)[:n].to(torch.uint8).reshape(x.shape), absmax


def dequantize_blocks_8bit(
    q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """code[q] * absmax[block] in fp32; q: uint8 any shape -> fp32 of q's shape."""
    flat = q.reshape(-1).long()
    block_of = torch.arange(flat.numel(), device=q.device) // blocksize
    values = code.to(device=q.device, dtype=torch.float32)[flat] * absmax.to(torch.float32)[block_of]
    return values.reshape(q.shape)
