"""The bf16 decode GEMV with its codebook in registers: y = x W^T (+ b) for one bf16 row x, straight from the
packed 4-bit W.

Why: the exact GEMV (`triton_gemv._gemv_kernel`) looks each code up in a 16-entry table in global memory; those
gathers, not memory bandwidth, bound it (0.86x the bf16 GEMV on an H200). Here the lookup is done in registers
by the byte-permute instruction (PTX `prmt.b32 d, a, b, c`: byte i of d is byte c[4i+2:4i] of the 8 bytes
{b, a}; with c[4i+3] set, that byte's sign bit replicated), so it costs integer instructions only.

The algorithm, per 32-bit word w of packed codes (8 values; byte j holds value 2j in its high nibble, 2j+1 in
its low one, so nibble i of w is value i ^ 1):
* the codebook, rounded to bf16 (round to nearest even), is split into a low-byte plane and a high-byte plane,
  each 16 bytes in 4 words (`planes`): plane word t holds the bytes of codes 4t..4t+3;
* s = w & 0x77777777 picks, per nibble, a byte of codes 0..7 (`prmt(T0, T1, s)`) and of codes 8..15
  (`prmt(T2, T3, s)`); m = 0x32103210 | ((w >> 1) & 0x44444444) then chooses between the two by the
  nibble's top bit (`prmt(r0, r1, m)`), giving the plane's bytes of 4 values in nibble order; the upper 4
  nibbles use s >> 16 and m >> 16;
* two more permutes interleave the low and high bytes into bf16 pairs, and shift / mask make the fp32 values.
30 integer instructions per 8 values (ptxas fuses some), no memory access. `lookup8` runs that sequence as inline PTX on the GPU
and, under the Triton interpreter (CI), as the same sequence of `prmt` steps written in plain integer operations
(`_prmt`), so CI tests the algorithm (tables, selectors, value order) and the GPU benchmark checks the PTX
against the same emulation, bit for bit.

x's layout (X_MODE): Triton gives each load a register layout from its addresses; x's 4 words per W word read
at stride 4 (mode 0) get another layout than W's, and the exchange through shared memory that reconciles them
costs more than the lookups (1.7x the bf16 GEMV on an H200). Mode 1 transposes x's words on the host first
([4, K/8], one small copy), so x loads like W: 0.85x / 0.76x the bf16 GEMV for 14336x4096 / 28672x8192
(benchmarks/results/gemv-lut-sweep-h200.json), against 0.85x / 0.83x for the exact kernel. Not the 0.5x hoped
for, and it needs the extra launch, so it is opt-in (GemvConfig(lut=True)); the exact kernel stays the default.

Accuracy: codes rounded to bf16 (relative error <= 2^-9), absmax in fp32, fp32 accumulation: the same order of
error as the reference's bf16 W = bf16(code * absmax). bf16 x only; fp16 and fp32 x take the exact kernel.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..quant.codebooks import code_4bit
from .triton_dequant import load_absmax


@lru_cache(maxsize=None)
def planes(quant_type: str) -> tuple[int, ...]:
    """The 8 words (low-byte plane words 0..3, then high-byte plane words 0..3) of the bf16-rounded codebook,
    as signed 32-bit integers (kernel arguments)."""
    bits = code_4bit(quant_type).to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    out = []
    for shift in (0, 8):
        plane = [(int(b) >> shift) & 0xFF for b in bits]
        for t in range(4):
            word = sum(plane[4 * t + i] << (8 * i) for i in range(4))
            out.append(word - (1 << 32) if word >= 1 << 31 else word)
    return tuple(out)


@triton.jit
def _prmt(a, b, c):
    """PTX prmt.b32 (default mode) in integer operations, for the interpreter: byte i of the result is byte
    (c >> 4i) & 7 of {b, a} (a = bytes 0..3), or, when bit 4i+3 of c is set, that byte's bit 7 replicated."""
    out = a & 0
    for i in tl.static_range(4):
        sel = (c >> (4 * i)) & 15
        idx = sel & 7
        src = tl.where(idx < 4, a, b)
        byte = (src >> (8 * (idx & 3))) & 255
        byte = tl.where((sel & 8) != 0, ((byte >> 7) & 1) * 255, byte)
        out = out | (byte << (8 * i))
    return out


@triton.jit
def _half4(s, m, l0, l1, l2, l3, h0, h1, h2, h3):
    """fp32 bit patterns of the 4 values of one half-word's nibbles: (values 0, 1, 2, 3 of that half)."""
    lo = _prmt(_prmt(l0, l1, s), _prmt(l2, l3, s), m)
    hi = _prmt(_prmt(h0, h1, s), _prmt(h2, h3, s), m)
    p = _prmt(lo, hi, 0x5140)  # bf16 of nibble 0 (value 1) low, of nibble 1 (value 0) high
    q = _prmt(lo, hi, 0x7362)  # nibble 2 (value 3) low, nibble 3 (value 2) high
    return p & -65536, p << 16, q & -65536, q << 16


@triton.jit
def lookup8(w, l0, l1, l2, l3, h0, h1, h2, h3, USE_ASM: tl.constexpr):
    """The 8 values of int32 words `w` of packed codes as fp32 (values 0..7 in order), codes from the planes."""
    if USE_ASM:
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            # the emulation below, in PTX (register names q*: scoped by the braces)
            "{\n"
            ".reg .b32 qs, qm, qr0, qr1, qlo, qhi, qp;\n"
            "and.b32 qs, $8, 0x77777777;\n"
            "shr.u32 qm, $8, 1;\n"
            "and.b32 qm, qm, 0x44444444;\n"
            "or.b32 qm, qm, 0x32103210;\n"
            "prmt.b32 qr0, $9, $10, qs;\n"
            "prmt.b32 qr1, $11, $12, qs;\n"
            "prmt.b32 qlo, qr0, qr1, qm;\n"
            "prmt.b32 qr0, $13, $14, qs;\n"
            "prmt.b32 qr1, $15, $16, qs;\n"
            "prmt.b32 qhi, qr0, qr1, qm;\n"
            "prmt.b32 qp, qlo, qhi, 0x5140;\n"
            "and.b32 $0, qp, 0xFFFF0000;\n"
            "shl.b32 $1, qp, 16;\n"
            "prmt.b32 qp, qlo, qhi, 0x7362;\n"
            "and.b32 $2, qp, 0xFFFF0000;\n"
            "shl.b32 $3, qp, 16;\n"
            "shr.u32 qs, qs, 16;\n"
            "shr.u32 qm, qm, 16;\n"
            "prmt.b32 qr0, $9, $10, qs;\n"
            "prmt.b32 qr1, $11, $12, qs;\n"
            "prmt.b32 qlo, qr0, qr1, qm;\n"
            "prmt.b32 qr0, $13, $14, qs;\n"
            "prmt.b32 qr1, $15, $16, qs;\n"
            "prmt.b32 qhi, qr0, qr1, qm;\n"
            "prmt.b32 qp, qlo, qhi, 0x5140;\n"
            "and.b32 $4, qp, 0xFFFF0000;\n"
            "shl.b32 $5, qp, 16;\n"
            "prmt.b32 qp, qlo, qhi, 0x7362;\n"
            "and.b32 $6, qp, 0xFFFF0000;\n"
            "shl.b32 $7, qp, 16;\n"
            "}", "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
            [w, l0, l1, l2, l3, h0, h1, h2, h3], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    else:
        s = w & 0x77777777
        m = ((w >> 1) & 0x44444444) | 0x32103210
        e0, e1, e2, e3 = _half4(s, m, l0, l1, l2, l3, h0, h1, h2, h3)
        e4, e5, e6, e7 = _half4((s >> 16) & 0xFFFF, (m >> 16) & 0xFFFF, l0, l1, l2, l3, h0, h1, h2, h3)
    return (e0.to(tl.float32, bitcast=True), e1.to(tl.float32, bitcast=True), e2.to(tl.float32, bitcast=True),
            e3.to(tl.float32, bitcast=True), e4.to(tl.float32, bitcast=True), e5.to(tl.float32, bitcast=True),
            e6.to(tl.float32, bitcast=True), e7.to(tl.float32, bitcast=True))


@triton.jit
def _bf16_pair(xp):
    """(even, odd) fp32 values of words holding two bf16 values (even column in the low half): exact."""
    return (xp << 16).to(tl.float32, bitcast=True), (xp & -65536).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["ONE"])
def gemv_lut_kernel(
    xw_ptr, words_ptr, absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, bias_ptr, y_ptr,
    N, K, K_WORDS, l0, l1, l2, l3, h0, h1, h2, h3, ONE,
    BLOCKSIZE: tl.constexpr, SUB: tl.constexpr, CHUNKS: tl.constexpr, ROWS: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr,
    X_MODE: tl.constexpr, INDEX_64: tl.constexpr,
):
    # X_MODE 0: x as bf16 pair words, word 4j + i holding values 8j + 2i, 8j + 2i + 1; 1: the same words
    # transposed to [4, K_WORDS] (xw_ptr + i * K_WORDS + j), so that x loads like W; 2: as 0, with W's word index
    # multiplied by a run-time 1 (ONE), so that W and x load with the same (scalar) layout.
    # Tile [ROWS, CHUNKS, WPC] words of W; a chunk (SUB values, WPC words) lies inside one quantization block.
    # X's words for a chunk are loaded once per step and shared by the ROWS rows.
    WPC: tl.constexpr = SUB // 8
    STEP: tl.constexpr = CHUNKS * WPC  # words of a row per loop step
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    if INDEX_64:
        rows = rows.to(tl.int64)
    chunk = tl.arange(0, CHUNKS) * WPC
    inner = tl.arange(0, WPC)
    if X_MODE == 2:
        inner = inner * ONE
    row_word = rows * K_WORDS
    row_elem = rows * K
    acc = tl.zeros([ROWS, CHUNKS, WPC], dtype=tl.float32)
    for kw in range(0, K_WORDS, STEP):
        cw = kw + chunk
        c_ok = cw < K_WORDS
        widx = cw[:, None] + inner[None, :]
        if X_MODE == 1:
            xb = xw_ptr + widx
            xs = K_WORDS
        else:
            xb = xw_ptr + 4 * widx
            xs = 1
        x0, x1 = _bf16_pair(tl.load(xb, mask=c_ok[:, None], other=0))
        x2, x3 = _bf16_pair(tl.load(xb + xs, mask=c_ok[:, None], other=0))
        x4, x5 = _bf16_pair(tl.load(xb + 2 * xs, mask=c_ok[:, None], other=0))
        x6, x7 = _bf16_pair(tl.load(xb + 3 * xs, mask=c_ok[:, None], other=0))
        ok = row_ok[:, None] & c_ok[None, :]
        w = tl.load(words_ptr + row_word[:, None, None] + widx[None, :, :], mask=ok[:, :, None], other=0)
        a = load_absmax((row_elem[:, None] + 8 * cw[None, :]) // BLOCKSIZE, ok,
                        absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
        e0, e1, e2, e3, e4, e5, e6, e7 = lookup8(w, l0, l1, l2, l3, h0, h1, h2, h3, USE_ASM)
        part = e0 * x0[None] + e1 * x1[None] + e2 * x2[None] + e3 * x3[None]
        part += e4 * x4[None] + e5 * x5[None] + e6 * x6[None] + e7 * x7[None]
        acc += part * a[:, :, None]
    out = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _lookup_kernel(w_ptr, out_ptr, n, l0, l1, l2, l3, h0, h1, h2, h3, BLOCK: tl.constexpr, USE_ASM: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    w = tl.load(w_ptr + i, mask=ok, other=0)
    e0, e1, e2, e3, e4, e5, e6, e7 = lookup8(w, l0, l1, l2, l3, h0, h1, h2, h3, USE_ASM)
    o = out_ptr + 8 * i
    tl.store(o, e0, mask=ok)
    tl.store(o + 1, e1, mask=ok)
    tl.store(o + 2, e2, mask=ok)
    tl.store(o + 3, e3, mask=ok)
    tl.store(o + 4, e4, mask=ok)
    tl.store(o + 5, e5, mask=ok)
    tl.store(o + 6, e6, mask=ok)
    tl.store(o + 7, e7, mask=ok)


def lookup_values(words: torch.Tensor, quant_type: str, use_asm: bool) -> torch.Tensor:
    """`lookup8` on int32 `words` [n] -> fp32 [n, 8] (the 8 values of each word, in order), through the PTX
    (use_asm, GPU only) or through the integer emulation: the lookup alone, for tests and the GPU self-check."""
    n = words.numel()
    out = torch.empty(n, 8, dtype=torch.float32, device=words.device)
    block = 1024
    _lookup_kernel[(-(-n // block),)](words.contiguous(), out, n, *planes(quant_type), BLOCK=block,
                                      USE_ASM=use_asm)
    return out
