"""Causal-LM loss from the decoder's hidden states, in chunks, so that the logits of the whole batch never exist
at once.

With a frozen LM head (QLoRA's case) the loss is one autograd function, `linear_cross_entropy_sum`: for each
chunk of rows it computes the logits (in the compute dtype, as the model's own head would), their loss and, in
place, their gradient (the kernels' `cross_entropy_grad`: no fp32 copy of the logits), then the chunk's hidden-
state gradient, which backward only scales. One matmul fewer than recomputing the logits in backward, and the
largest transient is one chunk of logits. A head that trains takes the composed, checkpointed path instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import kernels
from ..data.pieces import IGNORE_INDEX


# Rows per chunk of the fused loss: its bf16 logits are the loss's largest transient (0.5 GiB at 2048 rows and a
# 128k vocabulary), and 2048 rows keep the head matmul efficient.
FUSED_CHUNK_TOKENS = 2048


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(hidden.dtype)
            grad_h = torch.empty_like(hidden)
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk]
                logits = h @ w.t()
                total += kernels.call("cross_entropy_grad", logits, targets[start:start + chunk]).sum()
                torch.mm(logits, w, out=grad_h[start:start + chunk])
                del logits
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), None, None, None


def _rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
          grad_h: torch.Tensor | None) -> torch.Tensor:
    """Each row's cross-entropy (fp32 [M]) by chunks of logits; with `grad_h`, each row's hidden-state gradient
    written into it."""
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(hidden.dtype)
        rows = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            logits = hidden[start:start + chunk] @ w.t()
            rows[start:start + chunk] = kernels.call("cross_entropy_grad", logits, targets[start:start + chunk])
            if grad_h is not None:
                torch.mm(logits, w, out=grad_h[start:start + chunk])
            del logits
    return rows


class _LinearCrossEntropyRowsFn(torch.autograd.Function):
    """As _LinearCrossEntropyFn, but each row's loss is an output: backward scales each row's hidden-state
    gradient by its own incoming gradient (a preference loss weighs every sequence differently)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        grad_h = torch.empty_like(hidden)
        rows = _rows(hidden, weight, targets, chunk, grad_h)
        ctx.save_for_backward(grad_h)
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_rows.to(grad_h.dtype).unsqueeze(1), None, None, None


def linear_cross_entropy_rows(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_tokens: int = FUSED_CHUNK_TOKENS) -> torch.Tensor:
    """cross_entropy(hidden W^T, targets) of each row: hidden [M, H], weight [V, H] (frozen), targets [M] in
    [0, V); fp32 [M], the same numbers with and without gradients (a reference forward equals the policy's)."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_rows: the LM head weight must be frozen (it gets no gradient here)")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _LinearCrossEntropyRowsFn.apply(hidden.contiguous(), weight, targets, chunk_tokens)
    return _rows(hidden.contiguous(), weight, targets, chunk_tokens, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_tokens: int = 4096) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden W^T, targets): hidden [M, H] (compute dtype), weight [V, H] (frozen),
    targets [M] int64 in [0, V); fp32 scalar. The gradient reaches `hidden` only."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy_sum: the LM head weight must be frozen (it gets no gradient here)")
    return _LinearCrossEntropyFn.apply(hidden.contiguous(), weight, targets, chunk_tokens)


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss_sum(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 4096
) -> torch.Tensor:
    """Sum over target tokens of -log p(label[t+1] | ... t).

    hidden: [B, T, H] (compute dtype); lm_head_weight: [V, H]; labels: [B, T] int64 with IGNORE_INDEX where no
    loss is taken. Returns an fp32 scalar: the SUM (callers divide by the token count of the whole optimizer
    step, so that micro-batching does not change the gradient).
    """
    h = hidden[:, :-1, :].reshape(-1, hidden.shape[-1])
    t = labels[:, 1:].reshape(-1)
    keep = t != IGNORE_INDEX
    h, t = h[keep], t[keep]
    if torch.is_grad_enabled() and h.requires_grad and not lm_head_weight.requires_grad:
        if torch.is_autocast_enabled(h.device.type):
            h = h.to(torch.get_autocast_dtype(h.device.type))
        return linear_cross_entropy_sum(h, lm_head_weight, t, min(chunk_tokens, FUSED_CHUNK_TOKENS))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk_tokens):
        hs, ts = h[start : start + chunk_tokens], t[start : start + chunk_tokens]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, hs, lm_head_weight, ts, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hs, lm_head_weight, ts)
    return total


def count_targets(labels: torch.Tensor) -> int:
    """Target tokens of a batch: labels [B, T] int64 positions 1.. that are not IGNORE_INDEX (what the loss sums)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def decoder_loss_sum(lm: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """causal_lm_loss_sum of a causal LM's decoder hidden states and its head's weight (no logits tensor)."""
    hidden = lm.get_decoder()(**inputs, use_cache=False).last_hidden_state
    weight = lm.get_output_embeddings().weight
    if weight.device != hidden.device:  # a head kept in host memory (model/host_embedding.HostHead): in for the loss
        weight = weight.to(hidden.device, non_blocking=True)
    return causal_lm_loss_sum(hidden, weight, labels)
