"""Blockwise 8-bit optimizer states: the two dynamic maps and the rounding that puts a moment into them.

A moment tensor of n elements is cut into blocks of `block_size` consecutive elements of the flattened tensor
(the last block may be shorter). Each block keeps its fp32 absmax; each element keeps a uint8 index into a
256-entry map: the signed dynamic map (bitsandbytes' values, `quant.codebooks.dynamic_map(True)`) for the first
moment, the unsigned one for the second.

Rounding (chosen for optimizer states; it is not `quant.blockwise.quantize_blocks_8bit`'s): x / absmax, with
IEEE division (absmax 0 -> x / 1 = 0), then the EXACT nearest map entry, found by counting the fp32 midpoints
between neighbouring sorted map entries that are strictly below the value; a value exactly on a midpoint takes
the lower entry. `quantize_blocks_8bit` first snaps the value to a 65536-point grid over [-1, 1], as bitsandbytes'
CPU path does for byte identity; that grid has no point at 0 and a step of 3e-5, so the map's entries below
~1.5e-5 (down to 1e-7) can never be chosen and tiny moments are inflated to ~1.5e-5 x absmax with the sign of
the grid point. For optimizer states what matters is tracking 32-bit AdamW, so exact nearest rounding is used.
bitsandbytes' CUDA optimizers also round states to the nearest entry (by a search over the map); bytes are not
meant to be interchangeable with them.

The signed map holds 1.0 but not -1.0 (its lowest entry is -0.99297), so a block whose extreme is negative stores
that extreme 0.7% smaller in magnitude; the unsigned map spans [0, 1] exactly.

A zero moment is stored as the index of 0.0 (the signed map's zero, the unsigned map's first entry) with
absmax 0. A non-finite value poisons its block (its absmax becomes NaN or inf), as it would poison an fp32 state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..quant.codebooks import dynamic_map


@dataclass(frozen=True)
class StateMaps:
    """Per device: the signed and unsigned maps, fp32 [256] each, ascending, and their midpoints fp32 [255]."""

    signed: torch.Tensor
    signed_mid: torch.Tensor
    unsigned: torch.Tensor
    unsigned_mid: torch.Tensor
    signed_zero: int  # the index of 0.0 in the signed map


@lru_cache(maxsize=None)
def state_maps(device: torch.device) -> StateMaps:
    signed = dynamic_map(True).to(device)
    unsigned = dynamic_map(False).to(device)
    zero = int((signed == 0).nonzero()[0, 0])
    return StateMaps(signed, _midpoints(signed), unsigned, _midpoints(unsigned), zero)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    # (a + b) * 0.5 in fp32, the same two roundings wherever it is computed.
    return ((code[:-1] + code[1:]) * 0.5).contiguous()


def nearest_index(normed: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest map entry: the number of midpoints strictly below each value."""
    return torch.bucketize(normed, midpoints, right=False).to(torch.uint8)


def quantize_state(x: torch.Tensor, code: torch.Tensor, midpoints: torch.Tensor,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [n] -> (uint8 codes [n], fp32 absmax [ceil(n / block_size)]), on x's device."""
    n = x.numel()
    nb = -(-n // block_size)
    padded = torch.nn.functional.pad(x.reshape(-1), (0, nb * block_size - n)).view(nb, block_size)
    absmax = padded.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = nearest_index(padded / safe[:, None], midpoints)
    return codes.reshape(-1)[:n].contiguous(), absmax


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int) -> torch.Tensor:
    """code[q] * absmax[block] in fp32 (one rounding); codes uint8 [n] -> fp32 [n]."""
    n = codes.numel()
    nb = absmax.numel()
    values = code[codes.reshape(-1).long()]
    values = torch.nn.functional.pad(values, (0, nb * block_size - n)).view(nb, block_size) * absmax[:, None]
    return values.reshape(-1)[:n]


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)
