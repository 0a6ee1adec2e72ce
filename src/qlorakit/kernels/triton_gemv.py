"""Y = X W^T (+ b) straight from the packed 4-bit W, with no dequantized copy: the decode GEMV (1 row), a small-M
fused dequantize-in-GEMM (tensor-core `tl.dot`, any number of rows, used for 2..16), and a per-element kernel
for a K that does not split into whole quantization blocks (blocks straddle rows).

The weight W [N, K] is stored as the flattened row-major tensor in blocks of `blocksize`: value (n, k) is
element e = n*K + k, its code is nibble e % 2 of byte e // 2, its absmax that of block e // blocksize.

Aligned kernels (K a multiple of SUB = min(blocksize, K_TILE)): a tile is [rows, chunks, SUB/2 bytes]; one
chunk lies inside one quantization block, so the absmax is decoded once per (row, chunk) (nested constants
in-kernel) instead of once per value. Rows are byte-aligned (K even), and a byte's high nibble multiplies the
even column of X, its low nibble the odd one, so the codes are never interleaved in registers. X is read as
words holding columns (2j, 2j+1) (`_x_pairs`).
* `_gemv_kernel` (1 row): fp32 FMAs; per chunk sum_k code[q]*x[k], times the chunk's absmax, summed in fp32.
  Each program owns ROWS_PER_PROGRAM rows and walks the whole of K, so no split-K reduction is needed (the
  grid has N / ROWS_PER_PROGRAM programs: thousands for the Llama shapes). Its time goes to the codebook
  lookups (gathers that hit L1), not to memory: on an H200 it runs at 0.86x the bf16 GEMV (docs/kernels.md
  lists what was tried).
* `_gemm_kernel` (any rows, BLOCK_M of them per program): W's tile is dequantized exactly as the reference
  does (dtype(code*absmax)), then multiplied on the tensor cores with fp32 accumulation; fp32 inputs use
  `input_precision="ieee"` (no tf32). Launched with enable_fp_fusion=False, so the dequantized W equals the
  reference's W bit for bit and only the summation order differs from torch's matmul of it.
Accuracy (tests/kernels/test_triton_gemv.py): fp32 accumulation; against an fp64 product of the same W the
relative error is the output's rounding (bf16 ~2e-3, fp16 ~3e-4) and ~1e-7 with fp32 inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import QlorakitError
from ..quant.state import QuantState
from .triton_common import INT32_LIMIT, absmax_args, check_device, code_tables, interpreting, packed_bytes
from .triton_dequant import load_absmax


INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GemvConfig:
    """1-row kernel: ROWS_PER_PROGRAM rows of W, K_TILE values of each row per loop step, VEC contiguous packed
    bytes per thread."""

    rows_per_program: int = 4
    k_tile: int = 2048
    num_warps: int = 4
    vec: int = 8


@dataclass(frozen=True)
class GemmConfig:
    """Fused kernel: BLOCK_M rows of X x BLOCK_N rows of W per program, K_TILE values of K per loop step."""

    block_m: int = 16
    block_n: int = 32
    k_tile: int = 128
    num_warps: int = 2
    num_stages: int = 1  # the loop prefetches by hand; Triton's pipeliner would stage the codebook gathers too


GEMV_CONFIG = GemvConfig()
GEMM_CONFIG = GemmConfig()


@triton.jit
def _x_pairs(xw, X_KIND: tl.constexpr, AS_FP32: tl.constexpr):
    """Split words holding X's columns 2j (low half) and 2j+1 (high half): bf16/fp16 pairs in int32 words
    (X_KIND 0/1), fp32 pairs in int64 words (X_KIND 2). Returns (even, odd) in fp32 or, unless AS_FP32, in X's
    dtype. Bit operations only: exact."""
    if X_KIND == 2:
        even = xw.to(tl.int32).to(tl.float32, bitcast=True)
        odd = (xw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        if X_KIND == 0:
            dt: tl.constexpr = tl.bfloat16
        else:
            dt: tl.constexpr = tl.float16
        even = xw.to(tl.int16).to(dt, bitcast=True)
        odd = (xw >> 16).to(tl.int16).to(dt, bitcast=True)
        if AS_FP32:
            even = even.to(tl.float32)
            odd = odd.to(tl.float32)
    return even, odd


@triton.jit
def _code_at(table, q4):
    """code[q] with q4 = 4*q, `table` the codebook's address as an integer: the table is 64-byte aligned, so
    address = table | q4 takes one 32-bit OR instead of a 64-bit multiply-add per lookup (the lookups are what
    bounds this kernel)."""
    return tl.load((table | q4.to(tl.int64)).to(tl.pointer_type(tl.float32)))


@triton.jit
def _gemv_kernel(
    xw_ptr, packed_ptr, code_ptr, absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, bias_ptr, y_ptr,
    N, K, K_BYTES,
    BLOCKSIZE: tl.constexpr, SUB: tl.constexpr, CHUNKS: tl.constexpr, ROWS: tl.constexpr, VEC: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, X_KIND: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    # Tile [ROWS, CHUNKS, HB / VEC, VEC] bytes: VEC contiguous bytes per thread, and X's pair words (one 32-bit
    # word per byte for 16-bit X) in the same register layout, so X needs no exchange through shared memory.
    HB: tl.constexpr = SUB // 2
    G: tl.constexpr = HB // VEC
    STEP: tl.constexpr = CHUNKS * HB  # bytes of a row per loop step
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    if INDEX_64:
        rows = rows.to(tl.int64)
    chunk = tl.arange(0, CHUNKS) * HB
    inner = (tl.arange(0, G) * VEC)[:, None] + tl.arange(0, VEC)[None, :]  # byte offset inside a chunk
    row_byte = (rows * K_BYTES)[:, None, None, None] + inner[None, None, :, :]
    row_elem = rows[:, None] * K
    table = code_ptr.to(tl.int64, bitcast=True)
    acc = tl.zeros([ROWS, CHUNKS], dtype=tl.float32)
    for kb in range(0, K_BYTES, STEP):
        cb = kb + chunk  # [CHUNKS] byte offset of each chunk in its row
        ok = row_ok[:, None] & (cb < K_BYTES)[None, :]
        b = tl.load(packed_ptr + row_byte + cb[None, :, None, None], mask=ok[:, :, None, None], other=0)
        a = load_absmax((row_elem + 2 * cb[None, :]) // BLOCKSIZE, ok,
                        absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
        xw = tl.load(xw_ptr + cb[:, None, None] + inner[None, :, :], mask=(cb < K_BYTES)[:, None, None], other=0)
        x_hi, x_lo = _x_pairs(xw, X_KIND, True)
        q = b.to(tl.int32)
        w_hi = _code_at(table, (q >> 2) & 60)  # 4 * (high nibble)
        w_lo = _code_at(table, (q << 2) & 60)  # 4 * (low nibble)
        part = w_hi * x_hi[None] + w_lo * x_lo[None]
        acc += tl.sum(tl.sum(part, axis=3), axis=2) * a
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemm_kernel(
    xw_ptr, packed_ptr, code_ptr, absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, bias_ptr, y_ptr,
    M, N, K, K_BYTES, stride_xwm, stride_ym,
    BLOCKSIZE: tl.constexpr, SUB: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_KIND: tl.constexpr, DOT_FP32: tl.constexpr, INDEX_64: tl.constexpr,
):
    HB: tl.constexpr = SUB // 2
    STEP: tl.constexpr = CHUNKS * HB
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m_ok = ms < M
    if INDEX_64:
        rows = rows.to(tl.int64)
        ms = ms.to(tl.int64)
    chunk = tl.arange(0, CHUNKS) * HB
    i = tl.arange(0, HB)
    j = tl.arange(0, STEP)
    row_byte = (rows * K_BYTES)[:, None, None] + i[None, None, :]
    row_elem = rows[:, None] * K
    x_row = xw_ptr + ms[:, None] * stride_xwm

    ok = row_ok[:, None] & (chunk < K_BYTES)[None, :]
    b = tl.load(packed_ptr + row_byte + chunk[None, :, None], mask=ok[:, :, None], other=0)
    a = load_absmax((row_elem + 2 * chunk[None, :]) // BLOCKSIZE, ok,
                    absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, K_BYTES, STEP):
        xw = tl.load(x_row + (kb + j)[None, :], mask=m_ok[:, None] & ((kb + j) < K_BYTES)[None, :], other=0)
        nb = kb + STEP + chunk
        n_ok = row_ok[:, None] & (nb < K_BYTES)[None, :]
        b_next = tl.load(packed_ptr + row_byte + nb[None, :, None], mask=n_ok[:, :, None], other=0)
        a_next = load_absmax((row_elem + 2 * nb[None, :]) // BLOCKSIZE, n_ok,
                             absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, NESTED, NESTED_BLOCKSIZE)
        q = b.to(tl.int32)
        # The reference's W: dtype(code * absmax), one rounding (enable_fp_fusion=False keeps the nested absmax's
        # two roundings too).
        w_hi = tl.reshape((tl.load(code_ptr + (q >> 4)) * a[:, :, None]).to(y_ptr.dtype.element_ty), (BLOCK_N, STEP))
        w_lo = tl.reshape((tl.load(code_ptr + (q & 15)) * a[:, :, None]).to(y_ptr.dtype.element_ty), (BLOCK_N, STEP))
        x_hi, x_lo = _x_pairs(xw, X_KIND, DOT_FP32)
        if DOT_FP32:
            acc += tl.dot(x_hi, tl.trans(w_hi.to(tl.float32)), input_precision="ieee")
            acc += tl.dot(x_lo, tl.trans(w_lo.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x_hi, tl.trans(w_hi))
            acc += tl.dot(x_lo, tl.trans(w_lo))
        b = b_next
        a = a_next
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


@triton.jit
def _gemv_any_k_kernel(
    x_ptr, packed_ptr, code_ptr, absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, INDEX_64: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m_ok = ms < M
    if INDEX_64:
        rows = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (k < K)[None, :]
        e = rows[:, None] * K + k[None, :]  # [BLOCK_N, BLOCK_K] element index; blocks may straddle rows
        b = tl.load(packed_ptr + e // 2, mask=ok, other=0).to(tl.int32)
        q = (b >> (4 - 4 * (e % 2)).to(tl.int32)) & 15
        a = load_absmax(e // BLOCKSIZE, ok, absmax_ptr, q8_ptr, code8_ptr, absmax2_ptr, offset_ptr,
                        NESTED, NESTED_BLOCKSIZE)
        w = tl.load(code_ptr + q) * a
        xv = tl.load(x_ptr + ms[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(xv[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + ms[:, None] * stride_ym + rows[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])


_X_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _prepare(what: str, x2d: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None):
    """Checks and kernel arguments; kept to attribute checks and views, since at one row the host's time per call
    is comparable to the kernel's."""
    shape = state.shape
    if len(shape) != 2:
        raise QlorakitError(f"{what}: the weight must be 2-D, got shape {list(shape)}")
    n_out, k = int(shape[0]), int(shape[1])
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise QlorakitError(f"{what}: x must be [rows, {k}], got {list(x2d.shape)}")
    if x2d.dtype not in _X_KIND:
        raise QlorakitError(f"{what}: x dtype {x2d.dtype} not supported; allowed: {INPUT_DTYPES}")
    device = check_device(what, x2d, packed, *(() if bias is None else (bias,)))
    y = torch.empty((x2d.shape[0], n_out), dtype=x2d.dtype, device=device)
    if bias is None:
        bias_arg = y
    else:
        bias_arg = bias if bias.dtype == x2d.dtype and bias.is_contiguous() else bias.to(x2d.dtype).contiguous()
    return y, bias_arg, packed_bytes(packed, state.numel), absmax_args(state, device), \
        code_tables(state.quant_type, device).code


def _pair_words(x2d: torch.Tensor) -> torch.Tensor:
    """X [M, K] (K even) viewed as words holding columns (2j, 2j+1): int32 for 16-bit X, int64 for fp32."""
    word = torch.int64 if x2d.dtype == torch.float32 else torch.int32
    if x2d.stride(1) != 1 or x2d.stride(0) % 2 or x2d.storage_offset() % 2:
        x2d = x2d.contiguous()
    return x2d.view(word)


def aligned_sub(state: QuantState, k_tile: int) -> int | None:
    """The chunk length the aligned kernels use for this weight, or None when K does not split into chunks that
    each lie inside one quantization block."""
    k = int(state.shape[1])
    sub = min(state.blocksize, k_tile)
    return sub if k % sub == 0 else None


def gemv_4bit(
    x2d: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x2d [1, K] (bf16/fp16/fp32) -> [1, N] in x's dtype, reading the packed W once. Any K."""
    cfg = config or GEMV_CONFIG
    y, bias_arg, flat, absmax, code = _prepare("gemv_4bit", x2d, packed, state, bias)
    if x2d.shape[0] != 1:
        raise QlorakitError(f"gemv_4bit takes one row, got {x2d.shape[0]}; use matmul_4bit_small")
    n_out, k = int(state.shape[0]), int(state.shape[1])
    sub = aligned_sub(state, cfg.k_tile)
    if sub is None:
        return _any_k(x2d, flat, code, absmax, bias_arg, bias is not None, y, state)
    _gemv_kernel[(-(-n_out // cfg.rows_per_program),)](
        _pair_words(x2d), flat, code, *absmax.as_args(), bias_arg, y, n_out, k, k // 2,
        BLOCKSIZE=state.blocksize, SUB=sub, CHUNKS=cfg.k_tile // sub, ROWS=cfg.rows_per_program,
        VEC=min(cfg.vec, sub // 2), NESTED=absmax.nested, NESTED_BLOCKSIZE=absmax.nested_blocksize,
        HAS_BIAS=bias is not None,
        X_KIND=_X_KIND[x2d.dtype], INDEX_64=state.numel >= INT32_LIMIT, num_warps=cfg.num_warps,
        num_stages=1,
    )
    return y


def matmul_4bit_small(
    x2d: torch.Tensor, packed: torch.Tensor, state: QuantState, bias: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """x2d [M, K] (bf16/fp16/fp32) -> [M, N] in x's dtype: the fused dequantize-in-GEMM. Any M (best for few
    rows: W is decoded once per BLOCK_M rows of X); a K that does not split into whole blocks takes the
    per-element kernel, which needs M <= 16."""
    cfg = config or GEMM_CONFIG
    y, bias_arg, flat, absmax, code = _prepare("matmul_4bit_small", x2d, packed, state, bias)
    m = x2d.shape[0]
    n_out, k = int(state.shape[0]), int(state.shape[1])
    sub = aligned_sub(state, cfg.k_tile)
    if sub is None:
        if m > 16:
            raise QlorakitError(f"matmul_4bit_small: K={k} is not a multiple of {min(state.blocksize, cfg.k_tile)}"
                                f" and M={m} > 16; dequantize and use a dense matmul")
        return _any_k(x2d, flat, code, absmax, bias_arg, bias is not None, y, state)
    xw = _pair_words(x2d)
    grid = (-(-n_out // cfg.block_n), -(-m // cfg.block_m))
    _gemm_kernel[grid](
        xw, flat, code, *absmax.as_args(), bias_arg, y, m, n_out, k, k // 2, xw.stride(0), y.stride(0),
        BLOCKSIZE=state.blocksize, SUB=sub, CHUNKS=cfg.k_tile // sub, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        NESTED=absmax.nested, NESTED_BLOCKSIZE=absmax.nested_blocksize, HAS_BIAS=bias is not None,
        X_KIND=_X_KIND[x2d.dtype], DOT_FP32=x2d.dtype == torch.float32 or interpreting(),
        INDEX_64=max(state.numel, m * max(k, n_out)) >= INT32_LIMIT,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
    )
    return y


def _any_k(x2d, flat, code, absmax, bias_arg, has_bias, y, state) -> torch.Tensor:
    m = x2d.shape[0]
    if m > 16:
        raise QlorakitError(f"the per-element 4-bit kernel takes at most 16 rows, got {m}")
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    n_out, k = int(state.shape[0]), int(state.shape[1])
    block_n = 16
    _gemv_any_k_kernel[(-(-n_out // block_n),)](
        x2d, flat, code, *absmax.as_args(), bias_arg, y, m, n_out, k, x2d.stride(0), y.stride(0),
        BLOCKSIZE=state.blocksize, BLOCK_M=max(1, 1 << (m - 1).bit_length()), BLOCK_N=block_n, BLOCK_K=128,
        NESTED=absmax.nested, NESTED_BLOCKSIZE=absmax.nested_blocksize, HAS_BIAS=has_bias,
        INDEX_64=state.numel >= INT32_LIMIT, num_warps=4,
    )
    return y


def rows_of(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])
