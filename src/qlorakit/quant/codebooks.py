"""The 4-bit and 8-bit codebooks: NF4, FP4, symmetric INT4 and the signed/unsigned 8-bit dynamic maps.

All codebooks are fp32 tensors on the CPU; callers move them to their device. Values are those that
bitsandbytes uses, so that packed bytes are interchangeable with it (tests check against bitsandbytes).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import QuantizationError

# NormalFloat4: 8 negative quantiles of N(0,1), zero, 7 positive ones, normalised to [-1, 1] (QLoRA paper).
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (1 sign bit, 3 magnitude bits; bitsandbytes' e2m1 variant): code c and c|8 are +v and -v.
_FP4_MAGNITUDES_TWELFTHS: tuple[float, ...] = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")


@lru_cache(maxsize=None)
def _code_4bit(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        # Code 8 is +0.0 like code 0 (bitsandbytes stores no negative zero), so zero has two codes.
        mags = [m / 12.0 for m in _FP4_MAGNITUDES_TWELFTHS]
        return torch.tensor(mags + [-m if m else 0.0 for m in mags], dtype=torch.float32)
    raise QuantizationError(f"quant_type {quant_type!r} is not supported; allowed: {', '.join(QUANT_TYPES)}")


def code_4bit(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 codebook of `quant_type` ('nf4' or 'fp4'); index = the 4-bit code."""
    return _code_4bit(quant_type).to(device, copy=True)


@lru_cache(maxsize=None)
def _int4_symmetric() -> torch.Tensor:
    return torch.arange(-7, 8, dtype=torch.float32) / 7.0


def code_int4_symmetric() -> torch.Tensor:
    """Absmax-linear INT4: the 15 levels k/7, k = -7..7 (round to nearest). Used only to compare errors."""
    return _int4_symmetric().clone()


@lru_cache(maxsize=None)
def _dynamic_map(signed: bool) -> torch.Tensor:
    # Dynamic tree quantization (Dettmers 2015): a sign bit (when signed), then a run of zero bits that sets the
    # decimal exponent 10^-e, then the remaining bits as a linear fraction in [0.1, 1] (bin centres).
    exponent_levels = 7
    values: list[float] = [0.0, 1.0]
    for level in range(exponent_levels):
        fraction_bits = level if signed else level + 1
        edges = torch.linspace(0.1, 1.0, 2**fraction_bits + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2.0
        # The decimal scale multiplies in fp32, as bitsandbytes does: the map must match it to the last bit.
        scale = 10.0 ** (level - (exponent_levels - 1))
        values.extend((scale * centres).tolist())
        if signed:
            values.extend((-scale * centres).tolist())
    values.extend([0.0] * (256 - len(values)))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry 8-bit dynamic map, sorted ascending (signed: [-0.99297, 1]; unsigned: [0, 1])."""
    return _dynamic_map(signed).clone()
