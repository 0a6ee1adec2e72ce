"""Triton kernels for the elementwise parts of a Llama block in training: RMSNorm and SwiGLU, forward and
backward. Their specification is kernels/reference.py (rms_norm*, swiglu*), which computes what transformers'
LlamaRMSNorm and silu(gate) * up compute.

Each is one pass over memory: RMSNorm forward reads x and writes y and rstd (fp32 per row), backward reads dy
and x and writes dx; SwiGLU forward reads [gate | up] and writes silu(gate) * up, backward reads d_act and
[gate | up] and writes [d gate | d up]. The torch ops they replace make 5-8 passes, with fp32 temporaries.
Arithmetic is fp32; values are rounded to the storage dtype where the reference rounds them, and every launch
passes enable_fp_fusion=False so that no FMA contraction drops one of those roundings (see triton_rope.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dispatch import register


def rows_per_program() -> int:
    """Rows of a [rows, block] tile per program: 1 on a GPU (the launch measured on the H200), 16 under the
    Triton interpreter, whose cost is per program (tests/kernels run both)."""
    return 16 if os.environ.get("TRITON_INTERPRET") == "1" else 1


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, H, eps, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < H)
    offs = rows[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (w[None, :] * n).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, M, H, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (cols[None, :] < H)
    offs = rows[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)[:, None]
    dn = (dy * w[None, :]).to(dy_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds dy * w to dy's dtype
    dot = tl.sum(dn * x, axis=1)[:, None]
    dx = rstd * dn - rstd * rstd * rstd * x * (dot / H)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


@register("rms_norm", "triton")
def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, H] in promote(weight, x) dtype, rstd [M] fp32) for x [M, H]; see reference.rms_norm_ref.
    `rows`: rows per program (default rows_per_program())."""
    x2 = _rows(x)
    m, h = x2.shape
    y = torch.empty((m, h), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block, r = triton.next_power_of_2(h), rows or rows_per_program()
        _rms_norm_fwd_kernel[(triton.cdiv(m, r),)](x2, weight.contiguous(), y, rstd, m, h, float(eps), BLOCK=block,
                                                   ROWS=r, num_warps=min(16, max(1, block // 512)),
                                                   enable_fp_fusion=False)
    return y, rstd


@register("rms_norm_backward", "triton")
def rms_norm_backward_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                             rows: int | None = None) -> torch.Tensor:
    """dx [M, H] in x.dtype; see reference.rms_norm_backward_ref."""
    x2, dy2 = _rows(x), _rows(dy)
    m, h = x2.shape
    dx = torch.empty_like(x2)
    if m:
        block, r = triton.next_power_of_2(h), rows or rows_per_program()
        _rms_norm_bwd_kernel[(triton.cdiv(m, r),)](dy2, x2, weight.contiguous(), rstd.contiguous(), dx, m, h,
                                                   BLOCK=block, ROWS=r, num_warps=min(16, max(1, block // 512)),
                                                   enable_fp_fusion=False)
    return dx


@triton.jit
def _silu_rounded(g):
    """silu(g) in fp32 from fp32 g (torch computes x / (1 + exp(-x)))."""
    return g / (1.0 + tl.exp(-g))


@triton.jit
def _swiglu_fwd_kernel(gu_ptr, out_ptr, M, I, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < M) & (cols < I)
    g = tl.load(gu_ptr + rows * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + rows * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    s = _silu_rounded(g).to(out_ptr.dtype.element_ty).to(tl.float32)  # torch rounds silu(g) before the product
    tl.store(out_ptr + rows * I + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(da_ptr, gu_ptr, out_ptr, M, I, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < M) & (cols < I)
    da = tl.load(da_ptr + rows * I + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gu_ptr + rows * 2 * I + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + rows * 2 * I + I + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    s = _silu_rounded(g).to(gu_ptr.dtype.element_ty).to(tl.float32)
    dg = da * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(out_ptr + rows * 2 * I + cols, dg.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + rows * 2 * I + I + cols, (da * s).to(out_ptr.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


@register("swiglu", "triton")
def swiglu_triton(gu: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """silu(gate) * up [M, I] for gu [M, 2I] = [gate | up]; see reference.swiglu_ref."""
    gu2 = _rows(gu)
    m, i = gu2.shape[0], gu2.shape[1] // 2
    out = torch.empty((m, i), dtype=gu.dtype, device=gu.device)
    if m and i:
        r = rows or rows_per_program()
        _swiglu_fwd_kernel[(triton.cdiv(m, r), triton.cdiv(i, _SWIGLU_BLOCK))](
            gu2, out, m, i, BLOCK=_SWIGLU_BLOCK, ROWS=r, num_warps=4, enable_fp_fusion=False)
    return out


@register("swiglu_backward", "triton")
def swiglu_backward_triton(d_act: torch.Tensor, gu: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """[d gate | d up] [M, 2I] for d_act [M, I]; see reference.swiglu_backward_ref."""
    gu2, da2 = _rows(gu), _rows(d_act)
    m, i = gu2.shape[0], gu2.shape[1] // 2
    out = torch.empty_like(gu2)
    if m and i:
        r = rows or rows_per_program()
        _swiglu_bwd_kernel[(triton.cdiv(m, r), triton.cdiv(i, _SWIGLU_BLOCK))](
            da2, gu2, out, m, i, BLOCK=_SWIGLU_BLOCK, ROWS=r, num_warps=4, enable_fp_fusion=False)
    return out
