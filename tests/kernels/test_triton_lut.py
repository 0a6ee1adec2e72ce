"""The register lookup of the bf16 GEMV (kernels/triton_lut.py), piece by piece.

Specification: a packed word's 8 values are code[q] rounded to bf16 (round to nearest even), q being the 4-bit
codes in value order (byte j: high nibble = value 2j, low nibble = value 2j+1, as bitsandbytes packs them); the
byte permute that computes them follows PTX's prmt.b32 (default mode). The GPU run of the PTX itself is checked
against the same emulation, bit for bit, by benchmarks/kernels.py.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from qlorakit.kernels.triton_lut import _prmt, lookup_values, planes
from qlorakit.quant.codebooks import code_4bit


def prmt_model(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 d, a, b, c (default mode), one value at a time, from the PTX ISA's description."""
    src = (a & 0xFFFFFFFF) | ((b & 0xFFFFFFFF) << 32)  # bytes 0..3 from a, 4..7 from b
    d = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        d |= byte << (8 * i)
    return d


@triton.jit
def _prmt_kernel(a_ptr, b_ptr, c_ptr, d_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    ok = i < n
    a = tl.load(a_ptr + i, mask=ok)
    b = tl.load(b_ptr + i, mask=ok)
    c = tl.load(c_ptr + i, mask=ok)
    tl.store(d_ptr + i, _prmt(a, b, c), mask=ok)


def random_words(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)


def test_prmt_emulation_matches_the_ptx_description_including_sign_replication():
    n = 512
    a, b, c = random_words(n, 1), random_words(n, 2), random_words(n, 3)
    c[:16] = torch.tensor([0x3210, 0x7654, 0x5140, 0x7362, 0x8888, 0xFFFF, 0, 0x76543210] * 2, dtype=torch.int32)
    d = torch.empty_like(a)
    _prmt_kernel[(1,)](a, b, c, d, n, BLOCK=n)
    want = [prmt_model(int(x), int(y), int(z)) for x, y, z in zip(a, b, c)]
    assert [int(v) & 0xFFFFFFFF for v in d] == want


def codes_of(words: torch.Tensor) -> torch.Tensor:
    """[n] int32 words -> [n, 8] codes in value order."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    nib = torch.stack([(w >> (4 * i)) & 15 for i in range(8)], dim=1)
    return nib[:, [1, 0, 3, 2, 5, 4, 7, 6]]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lookup_gives_bf16_rounded_codes_in_value_order(quant_type):
    words = random_words(3000, 7)  # 3000: not a multiple of the block (masked tail)
    every = torch.arange(16, dtype=torch.int64)
    # Named cases: all 16 codes in every position, all-zero and all-ones words.
    words[:16] = ((every[:, None] << (4 * torch.arange(8))).sum(1) + 0).to(torch.int32)
    words[16] = 0
    words[17] = -1
    words[18] = int.from_bytes(bytes([0x01, 0x23, 0x45, 0x67]), "little")
    words[19] = int.from_bytes(bytes([0x89, 0xAB, 0xCD, 0xEF]), "little") - 2**32
    got = lookup_values(words, quant_type, use_asm=False)
    want = code_4bit(quant_type).to(torch.bfloat16).float()[codes_of(words)]
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_planes_hold_the_bf16_codebook():
    for quant_type in ("nf4", "fp4"):
        p = planes(quant_type)
        assert len(p) == 8 and all(-(2**31) <= v < 2**31 for v in p)
        lo = b"".join((v & 0xFFFFFFFF).to_bytes(4, "little") for v in p[:4])
        hi = b"".join((v & 0xFFFFFFFF).to_bytes(4, "little") for v in p[4:])
        bits = [lo[q] | (hi[q] << 8) for q in range(16)]
        want = code_4bit(quant_type).to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
        assert bits == want.tolist()
