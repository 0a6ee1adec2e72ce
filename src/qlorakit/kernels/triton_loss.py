"""Triton kernel for the cross-entropy pass of the fused linear + cross-entropy loss (train/loss.py): per row of
bf16/fp16/fp32 logits, the loss lse(row) - row[target] in fp32 and, in place of the logits, the row's gradient
softmax(row) - onehot(target) in the logits' dtype. Specification: reference.cross_entropy_grad_ref.

One program per row, two passes over the row (online max and sum of exponentials, then the gradient), so no fp32
copy of the logits exists; the torch ops it replaces make an fp32 copy, a log-softmax and its gradient in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import register
from .triton_block import rows_per_program


@triton.jit
def _cross_entropy_grad_kernel(logits_ptr, target_ptr, loss_ptr, M, V, stride, BLOCK: tl.constexpr,
                               ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = rows < M
    base = logits_ptr + rows[:, None] * stride
    # per lane: running max m and sum s of exp(x - m); lanes past V hold a finite stand-in far below any logit
    # (no inf - inf), whose exp(stand-in - row max) is 0 in the final sum
    m = tl.full((ROWS, BLOCK), -1e30, tl.float32)
    s = tl.zeros((ROWS, BLOCK), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        x = tl.load(base + cols, mask=live[:, None] & (cols < V), other=-1e30).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, axis=1)
    total = tl.sum(s * tl.exp(m - mx[:, None]), axis=1)
    lse = tl.where(live, mx + tl.log(total), 0.0)  # rows past M: a harmless value (nothing is stored for them)
    target = tl.load(target_ptr + rows, mask=live, other=0)
    x_t = tl.load(logits_ptr + rows * stride + target, mask=live, other=0.0).to(tl.float32)
    tl.store(loss_ptr + rows, lse - x_t, mask=live)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        mask = live[:, None] & (cols < V)
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse[:, None]) - tl.where(cols == target[:, None], 1.0, 0.0)
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


@register("cross_entropy_grad", "triton")
def cross_entropy_grad_triton(logits: torch.Tensor, targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """logits [M, V] (row-contiguous; overwritten by softmax - onehot), targets [M] int64 in [0, V); returns
    the fp32 loss per row [M]. `rows`: rows per program (default: kernels.triton_block.rows_per_program())."""
    m, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_grad: the logits' rows must be contiguous")
    loss = torch.empty(m, dtype=torch.float32, device=logits.device)
    if m:
        r = rows or rows_per_program()
        block = 4096 if r == 1 else 1024
        _cross_entropy_grad_kernel[(triton.cdiv(m, r),)](logits, targets.contiguous(), loss, m, v, logits.stride(0),
                                                         BLOCK=block, ROWS=r, num_warps=8)
    return loss
