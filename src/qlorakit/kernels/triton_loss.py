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


@triton.jit
def _cross_entropy_grad_kernel(logits_ptr, target_ptr, loss_ptr, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    # per lane: running max m and sum s of exp(x - m); lanes past V hold a finite stand-in far below any logit
    # (no inf - inf), whose exp(stand-in - row max) is 0 in the final sum
    m = tl.full((BLOCK,), -1e30, tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=-1e30).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - mx), axis=0)
    lse = mx + tl.log(total)
    target = tl.load(target_ptr + row)
    x_t = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - x_t)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


@register("cross_entropy_grad", "triton")
def cross_entropy_grad_triton(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [M, V] (row-contiguous; overwritten by softmax - onehot), targets [M] int64 in [0, V); returns
    the fp32 loss per row [M]."""
    m, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("cross_entropy_grad: the logits' rows must be contiguous")
    loss = torch.empty(m, dtype=torch.float32, device=logits.device)
    if m:
        _cross_entropy_grad_kernel[(m,)](logits, targets.contiguous(), loss, v, logits.stride(0), BLOCK=4096,
                                         num_warps=8)
    return loss
