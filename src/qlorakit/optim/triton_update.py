"""The fused AdamW update as one multi-tensor Triton kernel (32-bit or blockwise 8-bit moments).

One launch updates every parameter of a group (same parameter dtype, gradient dtype, state kind, block size,
and whether every size is a multiple of a program's elements, which drops the bounds masks). Each program reads
its tensor's row of a table of data pointers (param, grad, first moment, second moment and, for 8-bit, the two
absmax vectors) and of a table of the step's fp32 constants, and owns ROWS x BLOCK consecutive elements of it.
For 8-bit moments a row is one quantization block: the program dequantizes both moments, updates them and the
parameter in fp32, takes each block's new absmax and requantizes (nearest map entry by binary search over the
255 midpoints), all in one pass over memory: per element it reads param + grad + 2 bytes of codes and writes
param + 2 bytes.

Numerics equal `reference.adamw_update_8bit` / `adamw_update_32bit` operation for operation: fp32, no fused
multiply-add (launched with enable_fp_fusion=False), IEEE division (`div_rn`) and square root (`sqrt_rn`), the
same fp32 constants. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import UpdateItem
from .state_8bit import state_maps

BLOCK_32BIT = 256  # elements per row for fp32 moments; for 8-bit ones a row is one quantization block
ELEMENTS_PER_PROGRAM = 1024  # ROWS = max(1, this // block)
NUM_WARPS = 4
# Pointer table row: param, grad, m (fp32 or uint8 codes), v (fp32 or uint8 codes), m absmax, v absmax.
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _nearest_index(x, mid_ptr):
    # The number of midpoints (255, ascending) strictly below x: a binary search over 8 halvings.
    idx = tl.zeros(x.shape, tl.int32)
    for level in tl.static_range(8):
        probe = tl.load(mid_ptr + (idx + ((128 >> level) - 1)))
        idx = tl.where(probe < x, idx + (128 >> level), idx)
    return idx


@triton.jit
def _adamw_kernel(ptrs, consts, numels, prog_tensor, prog_row, code_m, mid_m, code_v, mid_v,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, QUANTIZED: tl.constexpr, EVEN: tl.constexpr,
                  BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(prog_tensor + pid).to(tl.int64)
    row0 = tl.load(prog_row + pid)
    n = tl.load(numels + t)
    row_ptrs = ptrs + t * 6
    p_ptr = tl.multiple_of(tl.load(row_ptrs + 0), 16).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.multiple_of(tl.load(row_ptrs + 1), 16).to(tl.pointer_type(G_DTYPE))
    c = consts + t * 8
    decay = tl.load(c + 0)
    beta1 = tl.load(c + 1)
    one_minus_beta1 = tl.load(c + 2)
    beta2 = tl.load(c + 3)
    one_minus_beta2 = tl.load(c + 4)
    inv_bias2_sqrt = tl.load(c + 5)
    eps = tl.load(c + 6)
    step_size = tl.load(c + 7)

    rows = row0 + tl.arange(0, ROWS)
    offs = rows.to(tl.int64)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < n
    row_mask = rows.to(tl.int64) < (n + BLOCK - 1) // BLOCK
    if EVEN:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    if QUANTIZED:
        qm_ptr = tl.multiple_of(tl.load(row_ptrs + 2), 16).to(tl.pointer_type(tl.uint8))
        qv_ptr = tl.multiple_of(tl.load(row_ptrs + 3), 16).to(tl.pointer_type(tl.uint8))
        am_ptr = tl.multiple_of(tl.load(row_ptrs + 4), 16).to(tl.pointer_type(tl.float32))
        av_ptr = tl.multiple_of(tl.load(row_ptrs + 5), 16).to(tl.pointer_type(tl.float32))
        if EVEN:
            qm = tl.load(qm_ptr + offs).to(tl.int32)
            qv = tl.load(qv_ptr + offs).to(tl.int32)
            am = tl.load(am_ptr + rows)
            av = tl.load(av_ptr + rows)
        else:
            qm = tl.load(qm_ptr + offs, mask=mask, other=0).to(tl.int32)
            qv = tl.load(qv_ptr + offs, mask=mask, other=0).to(tl.int32)
            am = tl.load(am_ptr + rows, mask=row_mask, other=0.0)
            av = tl.load(av_ptr + rows, mask=row_mask, other=0.0)
        m = tl.load(code_m + qm) * am[:, None]
        v = tl.load(code_v + qv) * av[:, None]
    else:
        m_ptr = tl.multiple_of(tl.load(row_ptrs + 2), 16).to(tl.pointer_type(tl.float32))
        v_ptr = tl.multiple_of(tl.load(row_ptrs + 3), 16).to(tl.pointer_type(tl.float32))
        if EVEN:
            m = tl.load(m_ptr + offs)
            v = tl.load(v_ptr + offs)
        else:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0)
            v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    p = p * decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    denom = tl.sqrt_rn(v) * inv_bias2_sqrt + eps
    p = p - tl.math.div_rn(m, denom) * step_size

    if EVEN:
        tl.store(p_ptr + offs, p.to(P_DTYPE))
    else:
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)

    if QUANTIZED:
        if not EVEN:
            m = tl.where(mask, m, 0.0)  # lanes past the end must not count towards the tail block's absmax
            v = tl.where(mask, v, 0.0)
        am = tl.max(tl.abs(m), axis=1)
        av = tl.max(tl.abs(v), axis=1)
        qm = _nearest_index(tl.math.div_rn(m, tl.where(am > 0, am, 1.0)[:, None]), mid_m).to(tl.uint8)
        qv = _nearest_index(tl.math.div_rn(v, tl.where(av > 0, av, 1.0)[:, None]), mid_v).to(tl.uint8)
        if EVEN:
            tl.store(qm_ptr + offs, qm)
            tl.store(qv_ptr + offs, qv)
            tl.store(am_ptr + rows, am)
            tl.store(av_ptr + rows, av)
        else:
            tl.store(qm_ptr + offs, qm, mask=mask)
            tl.store(qv_ptr + offs, qv, mask=mask)
            tl.store(am_ptr + rows, am, mask=row_mask)
            tl.store(av_ptr + rows, av, mask=row_mask)
    else:
        if EVEN:
            tl.store(m_ptr + offs, m)
            tl.store(v_ptr + offs, v)
        else:
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)


def kernel_accepts(item: UpdateItem) -> bool:
    """Whether the kernel can update this item in place (contiguous tensors of supported dtypes)."""
    return (item.param.dtype in _TL_DTYPES and item.grad.dtype in _TL_DTYPES and item.param.is_contiguous()
            and item.grad.is_contiguous() and not item.grad.is_sparse and item.param.numel() > 0
            and item.block_size & (item.block_size - 1) == 0 and 32 <= item.block_size <= 4096)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _program_map(numels: tuple[int, ...], block: int, rows: int, device: torch.device,
                 cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor index int32 [P], first row int32 [P]) of each program; cached by sizes."""
    key = (device, numels, block, rows)
    hit = cache.get(key)
    if hit is None:
        per_tensor = [_ceil_div(_ceil_div(n, block), rows) for n in numels]
        tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32),
                                            torch.tensor(per_tensor, dtype=torch.int64))
        starts = torch.cat([torch.arange(k, dtype=torch.int32) * rows for k in per_tensor])
        hit = (tensor_of.to(device), starts.to(device))
        cache[key] = hit
    return hit


def launch_updates(items: list[UpdateItem], cache: dict) -> None:
    """Update every item with as few launches as possible (one per dtype/state kind/evenness group).
    `cache` keeps the per-group program maps between steps (pass the same dict every step)."""
    groups: dict[tuple, list[UpdateItem]] = {}
    for it in items:
        block = it.block_size if it.quantized else BLOCK_32BIT
        rows = max(1, ELEMENTS_PER_PROGRAM // block)
        even = it.param.numel() % (block * rows) == 0
        key = (it.param.device, it.param.dtype, it.grad.dtype, it.quantized, block, rows, even)
        groups.setdefault(key, []).append(it)
    for (device, p_dtype, g_dtype, quantized, block, rows, even), group in groups.items():
        ptr_rows: list[int] = []
        const_rows: list[float] = []
        for it in group:
            ptr_rows += (it.param.data_ptr(), it.grad.data_ptr(), *it.pointers())
            const_rows += it.constants.row()
        numels = tuple(it.param.numel() for it in group)
        prog_tensor, prog_row = _program_map(numels, block, rows, device, cache)
        ptrs = _to_device(torch.tensor(ptr_rows + list(numels), dtype=torch.int64), device)
        consts = _to_device(torch.tensor(const_rows, dtype=torch.float32), device)
        maps = state_maps(device)
        _adamw_kernel[(prog_tensor.numel(),)](
            ptrs, consts, ptrs[len(ptr_rows):], prog_tensor, prog_row,
            maps.signed, maps.signed_mid, maps.unsigned, maps.unsigned_mid,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], QUANTIZED=quantized, EVEN=even,
            BLOCK=block, ROWS=rows, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
