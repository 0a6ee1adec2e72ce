"""Nibble packing in bitsandbytes' order: element 2j goes to the high nibble of byte j, 2j+1 to the low one."""

from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes.

    codes: uint8 (any integer dtype) with values 0..15, any shape, EVEN number of elements (callers pad odd
    lengths with the code of 0.0 first). Returns uint8 [numel // 2], on the same device.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        raise ValueError(f"pack_nibbles needs an even number of codes, got {flat.numel()}")
    return (flat[0::2] << 4) | flat[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 [>= ceil(n/2)] (any shape) -> uint8 [n] codes, same device."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    pairs = torch.stack((flat >> 4, flat & 0xF), dim=-1).reshape(-1)
    return pairs[:n]
